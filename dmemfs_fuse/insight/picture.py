"""Draw the pools as strips of dpages coloured by owner, so fragmentation shows at a glance."""

from __future__ import annotations

import colorsys
import hashlib
from typing import Any

from PIL import Image, ImageDraw

from ..sizes import ceil_div

FREE = (225, 225, 225)
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
COLUMNS = 128  # cells per row
CELL = 6  # pixels per cell side
ROW_GAP = 1
MAX_CELLS = 8192  # past this a cell stands for several dpages
LEGEND_ROWS = 12


def owner_colour(ino: int) -> tuple[int, int, int]:
    """A stable, saturated colour per inode, never grey (grey is free)."""
    hue = int(hashlib.sha256(str(ino).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def render(data: dict[str, Any], out_path: str) -> tuple[int, int]:
    """Draw the map that ``Reporter.map()`` returned into a PNG at *out_path*; return its size."""
    pools = data["pools"]
    names: dict[str, str] = data.get("names", {})
    heights = []
    layouts = []
    for pool in pools:
        total = pool["total_dpages"]
        per_cell = max(1, ceil_div(total, MAX_CELLS))
        cells = ceil_div(total, per_cell)
        rows = ceil_div(cells, COLUMNS)
        layouts.append((per_cell, cells, rows))
        heights.append(16 + rows * (CELL + ROW_GAP) + 8)
    owners = sorted({run[2] for pool in pools for run in pool["used"]})
    legend = owners[:LEGEND_ROWS]
    width = COLUMNS * (CELL + ROW_GAP) + 20
    height = sum(heights) + 14 * (len(legend) + 2) + 10
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    y = 4
    for pool, (per_cell, cells, _), block in zip(pools, layouts, heights, strict=True):
        used = sum(run[1] for run in pool["used"])
        draw.text((10, y), f"pool {pool['pool']} (node {pool['node']}): "
                  f"{pool['total_dpages'] - used} of {pool['total_dpages']} dpages free"
                  + (f", {per_cell} dpages per cell" if per_cell > 1 else ""), fill=TEXT)
        owner_of_cell: list[int | None] = [None] * cells
        for start, length, ino in pool["used"]:
            for cell in range(start // per_cell, (start + length - 1) // per_cell + 1):
                owner_of_cell[cell] = ino
        for cell, owner in enumerate(owner_of_cell):
            x0 = 10 + (cell % COLUMNS) * (CELL + ROW_GAP)
            y0 = y + 16 + (cell // COLUMNS) * (CELL + ROW_GAP)
            colour = FREE if owner is None else owner_colour(owner)
            draw.rectangle((x0, y0, x0 + CELL - 1, y0 + CELL - 1), fill=colour)
        y += block
    draw.rectangle((10, y, 20, y + 10), fill=FREE)
    draw.text((26, y), "free", fill=TEXT)
    y += 14
    for ino in legend:
        draw.rectangle((10, y, 20, y + 10), fill=owner_colour(ino))
        draw.text((26, y), names.get(str(ino), f"inode {ino}"), fill=TEXT)
        y += 14
    if len(owners) > len(legend):
        draw.text((26, y), f"... and {len(owners) - len(legend)} more files", fill=TEXT)
    image.save(out_path, "PNG")
    return image.size
