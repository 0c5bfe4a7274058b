"""Medians, ratios and targets from the raw samples, written as JSON, Markdown and a PNG."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .machine import GIB, KIB, MIB, describe
from .workloads import BY_NAME, GUEST_CONFIGS, GUEST_SHARES, Metric, Workload, guest_key

DMEMFS = "dmemfs"


def _ok_values(samples: list[dict[str, Any]], workload: str, variant: str,
               key: str) -> list[float]:
    return [s["metrics"][key] for s in samples
            if s["workload"] == workload and s["variant"] == variant and s.get("ok")
            and key in s["metrics"]]


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per workload: per variant and metric median/min/max/n; ratios; target verdicts."""
    samples = results["samples"]
    out: dict[str, Any] = {}
    for wname, wres in results["workloads"].items():
        work = BY_NAME[wname]
        stats: dict[str, dict[str, dict[str, float]]] = {}
        for variant in wres["variants"]:
            label = variant["label"]
            stats[label] = {}
            for metric in work.metrics:
                values = _ok_values(samples, wname, label, metric.key)
                if values:
                    stats[label][metric.key] = {
                        "median": statistics.median(values), "min": min(values),
                        "max": max(values), "n": len(values)}
        entry: dict[str, Any] = {"stats": stats}
        if work.comparative:
            entry["ratios"] = _ratios(work, stats)
        if wname == "alloc":
            entry["flatness"] = _flatness(stats, wres["variants"])
        if wname == "book":
            entry["per_gib"] = _per_gib(samples, wres["variants"])
        out[wname] = entry
    results["summary"] = out
    results["targets"] = _targets(results)
    return out


def _ratios(work: Workload, stats: dict[str, dict[str, dict[str, float]]]
            ) -> dict[str, dict[str, float]]:
    """dmemfs speed / peer speed for every metric (time metrics inverted, so >1 = dmemfs ahead)."""
    mine = stats.get(DMEMFS, {})
    out: dict[str, dict[str, float]] = {}
    for metric in work.metrics:
        if metric.unit == "flag" or metric.key not in mine:
            continue
        for peer, pstats in stats.items():
            if peer == DMEMFS or metric.key not in pstats:
                continue
            a, b = mine[metric.key]["median"], pstats[metric.key]["median"]
            if a > 0 and b > 0:
                ratio = a / b if metric.higher_is_better else b / a
                out.setdefault(metric.key, {})[peer] = ratio
    return out


def _flatness(stats: dict[str, dict[str, dict[str, float]]],
              variants: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per dpage size: the metric at each pool size, and largest / smallest pool."""
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        if v["kind"] != DMEMFS or v["label"] not in stats:
            continue
        dpage, pool = v["info"]["dpage"], v["info"]["pool"]
        for key, st in stats[v["label"]].items():
            if key.endswith("_ms"):
                out.setdefault(dpage, {}).setdefault(key, {})[str(pool)] = st["median"]
    for per_key in out.values():
        for key, by_pool in list(per_key.items()):
            pools = sorted(by_pool, key=int)
            if len(pools) >= 2:
                per_key[key + "_growth"] = by_pool[pools[-1]] / max(by_pool[pools[0]], 1e-6)
                per_key[key + "_delta"] = by_pool[pools[-1]] - by_pool[pools[0]]
    return out


def _slope(points: list[tuple[float, float]]) -> float | None:
    if len({x for x, _ in points}) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den


def _per_gib(samples: list[dict[str, Any]], variants: list[dict[str, Any]]
             ) -> dict[str, dict[str, float | None]]:
    """Slopes (bytes per managed GiB) of the daemon's memory over pool sizes, per dpage."""
    out: dict[str, dict[str, float | None]] = {}
    keys = ("idle_nonregion_rss", "full_nonregion_rss", "full_anon", "full_pte", "model_bytes")
    for dpage in sorted({v["info"]["dpage"] for v in variants}):
        labels = {v["label"]: v["info"]["pool"] for v in variants if v["info"]["dpage"] == dpage}
        row: dict[str, float | None] = {}
        for key in keys:
            points = [(labels[s["variant"]] / GIB, s["metrics"][key]) for s in samples
                      if s["workload"] == "book" and s.get("ok") and s["variant"] in labels
                      and key in s["metrics"]]
            row[key] = _slope(points)
        out[dpage] = row
    return out


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    verdicts: list[dict[str, Any]] = []
    summary = results["summary"]
    for wname in results["workloads"]:
        work = BY_NAME[wname]
        entry = summary.get(wname, {})
        for target in work.targets:
            row: dict[str, Any] = {"workload": wname, "number": work.number,
                                   "target": target.text, "metric": target.metric,
                                   "peer": target.peer}
            if work.comparative and target.peer is None:  # an absolute bound on dmemfs
                metric = next(m for m in work.metrics if m.key == target.metric)
                got = entry.get("stats", {}).get(DMEMFS, {}).get(target.metric, {}).get("median")
                limit = target.ratio or 0.0
                ok = got is not None and (got <= limit if not metric.higher_is_better
                                          else got >= limit)
                row.update(required=f"{'<=' if not metric.higher_is_better else '>='} "
                                    f"{limit:g} {metric.unit}",
                           measured=got,
                           measured_text=f"{got:.3g} {metric.unit}" if got is not None
                           else "n/a",
                           status=_status(ok, got is None))
            elif work.comparative:
                ratio = entry.get("ratios", {}).get(target.metric, {}).get(target.peer or "")
                row.update(required=f">= {target.ratio:g}x", measured=ratio,
                           measured_text=f"{ratio:.2f}x" if ratio is not None else "n/a",
                           status=_status(ratio is not None and target.ratio is not None
                                          and ratio >= target.ratio, ratio is None))
            elif wname == "alloc":
                row.update(_alloc_verdict(entry, target.metric, target.ratio or 10.0))
            elif wname == "book":
                dpage = target.metric.removeprefix("per_gib_")
                per = entry.get("per_gib", {}).get(dpage, {})
                rss = per.get("full_nonregion_rss")
                model = per.get("model_bytes")
                limit = target.ratio or 0.0
                anon = per.get("full_anon")
                shown = [f"RSS slope {_kib(rss)}/GiB" if rss is not None else "RSS slope n/a",
                         f"anonymous {_kib(anon)}/GiB" if anon is not None else "",
                         f"structures {_kib(model)}/GiB" if model is not None else ""]
                # The measure is RSS minus the region; the structures (exact,
                # from tracemalloc) are shown beside it to tell heap noise from cost.
                judged = rss if rss is not None else model
                row.update(required=f"<= {_kib(limit)}/GiB", measured=judged,
                           measured_text=", ".join(s for s in shown if s),
                           status=_status(judged is not None and judged <= limit,
                                          judged is None))
            verdicts.append(row)
    return verdicts


def _alloc_verdict(entry: dict[str, Any], key: str, limit_ms: float) -> dict[str, Any]:
    worst = None
    worst_label = ""
    for label, stats in entry.get("stats", {}).items():
        if not label.startswith(DMEMFS) or key not in stats:
            continue
        value = stats[key]["max"]
        if worst is None or value > worst:
            worst, worst_label = value, label
    # Flat: the largest pool at most twice the smallest, or within 1 ms of it (timer noise).
    pairs = [(per[key + "_growth"], per[key + "_delta"])
             for per in entry.get("flatness", {}).values() if key + "_growth" in per]
    growth = [g for g, _ in pairs]
    flat = all(g <= 2.0 or d < 1.0 for g, d in pairs)
    text = (f"worst {worst:.2f} ms ({worst_label}); largest/smallest pool "
            + ", ".join(f"{g:.1f}x" for g in growth)) if worst is not None else "n/a"
    return {"required": f"< {limit_ms:g} ms and flat", "measured": worst, "measured_text": text,
            "status": _status(worst is not None and worst < limit_ms and flat, worst is None)}


def _status(met: bool, unknown: bool) -> str:
    return "not measured" if unknown else ("met" if met else "MISSED")


def _kib(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / KIB:.1f} KiB" if abs(n) < MIB else f"{n / MIB:.2f} MiB"


def _fmt(value: float, metric: Metric) -> str:
    unit = metric.unit
    if unit == "B":
        return _kib(value)
    if unit == "flag":
        return "yes" if value >= 0.5 else "no"
    if unit in ("ms", "s"):
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _cell(stat: dict[str, float] | None, metric: Metric) -> str:
    if not stat:
        return "-"
    text = _fmt(stat["median"], metric)
    if stat["n"] > 1 and metric.unit != "flag" and stat["min"] != stat["max"]:
        text += f" <sub>({_fmt(stat['min'], metric)}-{_fmt(stat['max'], metric)})</sub>"
    return text


def markdown(results: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    lines = ["# dmemfs-fuse benchmark", ""]
    lines += [f"- {line}" for line in describe(results["machine"])]
    if results.get("dmemfs_command", "").endswith("/.venv/bin/dmemfs") is False or results.get(
            "dmemfs_bdi"):
        lines.append(f"- **dmemfs under test**: `{results.get('dmemfs_command')}`; bdi settings "
                     f"written after each mount: {results.get('dmemfs_bdi') or 'none'}")
    if results.get("dmemfs_exp"):
        exp = results["dmemfs_exp"]
        lines.append(f"- **dmemfs-exp** (an experimental copy of the daemon, alternated with the "
                     f"rest): `{exp['command']}`; bdi: {exp['bdi'] or 'as mounted'}")
    lines += [f"- command: `{results['command']}`",
              f"- run: {results['started']} to {results['finished']} "
              f"({results['elapsed_s'] / 60:.1f} min); rounds: {results['rounds']} "
              f"(alloc/book: {results['rounds_absolute']}); each measurement on a fresh mount "
              + ("(bookkeeping: on the allocation workload's mounts), "
                 if any(s.get("mount_shared_with") for s in results["samples"]) else ", ") +
              "variants alternated round by round (A B C A B C ...); cells are medians "
              "with (min-max)"]
    if results.get("interrupted"):
        lines.append("- **interrupted**: the numbers below are partial")
    lines += ["", "## Targets", "",
              "| # | target | required | measured | status |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['number']} | {t['target']} | {t['required']} | "
                     f"{t['measured_text']} | {t['status']} |")
    for wname, wres in results["workloads"].items():
        work = BY_NAME[wname]
        entry = results["summary"].get(wname, {})
        lines += ["", f"## {work.number}. {work.title}", ""]
        lines += [f"Sizes: {wres['sizes']}", ""] if wres.get("sizes") else []
        if work.comparative:
            lines += _comparative_table(work, wres, entry)
        elif wname == "guest":
            lines += _guest_table(entry)
        else:
            lines += _variant_table(work, wres, entry)
        if wname == "alloc" and entry.get("flatness"):
            lines += ["", "Growth from the smallest to the largest pool (median ms):", ""]
            for dpage, per in entry["flatness"].items():
                parts = [f"{k.removesuffix('_growth')} x{v:.2f}" for k, v in per.items()
                         if k.endswith("_growth")]
                lines.append(f"- {dpage} dpages: " + (", ".join(parts) or "one pool size only"))
        if wname == "book" and entry.get("per_gib"):
            lines += ["", "| dpage | RSS-minus-region slope, idle | same, all allocated | "
                      "of it anonymous (RssAnon) | page tables (VmPTE) slope | "
                      "pool+store structures | kernel struct page |",
                      "|---|---|---|---|---|---|---|"]
            for dpage, per in entry["per_gib"].items():
                kernel = "16 MiB/GiB" if dpage == "4K" else (
                    "16 MiB/GiB (2 MiB/GiB with HVO)" if dpage == "2M" else "")
                lines.append(f"| {dpage} | {_kib(per['idle_nonregion_rss'])}/GiB | "
                             f"{_kib(per['full_nonregion_rss'])}/GiB | "
                             f"{_kib(per.get('full_anon'))}/GiB | "
                             f"{_kib(per['full_pte'])}/GiB | {_kib(per['model_bytes'])}/GiB | "
                             f"{kernel} |")
        notes = [work.note] if work.note else []
        notes += wres.get("notes", [])
        skipped = [f"skipped {s['variant']}: {s['reason']}" for s in wres.get("skipped", [])]
        notes += list(dict.fromkeys(skipped))  # once per variant and reason
        notes += [f"error in {e['variant']} round {e['round']}: {e['error']}"
                  for e in wres.get("errors", [])]
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
    lines += ["", "## Huge pages", ""] + [f"- {line}" for line in results.get("hugepage_log",
                                                                          ["none reserved"])]
    return "\n".join(lines) + "\n"


def _comparative_table(work: Workload, wres: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    labels = [v["label"] for v in wres["variants"]]
    peers = [lab for lab in labels if lab != DMEMFS]
    head = ["metric", "unit", *labels, *[f"dmemfs/{p}" for p in peers]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    stats = entry.get("stats", {})
    ratios = entry.get("ratios", {})
    for metric in work.metrics:
        cells = [metric.label, metric.unit]
        cells += [_cell(stats.get(lab, {}).get(metric.key), metric) for lab in labels]
        cells += [f"{ratios[metric.key][p]:.2f}x" if p in ratios.get(metric.key, {}) else "-"
                  for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _guest_table(entry: dict[str, Any]) -> list[str]:
    stats: dict[str, dict[str, float]] = next(iter(entry.get("stats", {}).values()), {})
    lines = ["| share | configuration | ready (s) | total (s) | ready vs tmpfs | total vs tmpfs |",
             "|---|---|---|---|---|---|"]
    for share in GUEST_SHARES:
        for config in GUEST_CONFIGS:
            def get(what: str, share: str = share, config: str = config) -> str:
                st = stats.get(guest_key(share, config, what))
                if st is None:
                    return "-"
                return f"{st['median']:.2f}" + ("x" if what.startswith("ratio") else "")
            lines.append(f"| {share} | {config} | {get('ready_s')} | {get('total_s')} | "
                         f"{get('ratio_ready')} | {get('ratio_total')} |")
    return lines


def _variant_table(work: Workload, wres: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    metrics = list(work.metrics)
    head = ["variant", "options", *[f"{m.label} ({m.unit if m.unit != 'B' else 'KiB/MiB'})"
                                    for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    stats = entry.get("stats", {})
    for v in wres["variants"]:
        cells = [v["label"], f"`{v['options']}`"]
        cells += [_cell(stats.get(v["label"], {}).get(m.key), m) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_json(results: dict[str, Any], path: Path) -> None:
    """bench-results.json: machine, options, every sample, summary and targets."""
    path.write_text(json.dumps(results, indent=1, sort_keys=False, default=str) + "\n")


def chart(results: dict[str, Any], path: Path) -> None:
    """bench-results.png: dmemfs/peer ratios against targets, and allocation times by pool."""
    rows = []
    for wname, entry in results["summary"].items():
        work = BY_NAME[wname]
        if not work.comparative:
            continue
        required = {(t.metric, t.peer): t.ratio for t in work.targets}
        for metric in work.metrics:
            if not metric.higher_is_better:
                continue  # times: their throughput twin is charted
            for peer, ratio in entry.get("ratios", {}).get(metric.key, {}).items():
                rows.append((f"{work.number} {metric.label} / {peer}", ratio,
                             required.get((metric.key, peer))))
    alloc = results["summary"].get("alloc", {}).get("flatness", {})
    width, row_h, left, top = 1400, 26, 520, 70
    alloc_h = 360 if alloc else 0
    height = top + row_h * max(1, len(rows)) + 80 + alloc_h
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=15)
        big = ImageFont.load_default(size=20)
    except TypeError:  # Pillow < 10.1
        font = big = ImageFont.load_default()
    m = results["machine"]
    draw.text((10, 8), f"dmemfs-fuse benchmark: dmemfs / peer (log scale), {results['started']}",
              fill="black", font=big)
    draw.text((10, 36), f"{m['cores']} cores, {m['mem_total_bytes'] / GIB:.0f} GiB, Linux "
              f"{m['kernel']}; medians of {results['rounds']} rounds; | = target; green met, "
              "red missed, blue no target", fill="black", font=font)
    lo, hi = math.log10(0.001), math.log10(100)
    plot_w = width - left - 40

    def x_of(ratio: float) -> int:
        value = min(max(math.log10(max(ratio, 1e-9)), lo), hi)
        return int(left + (value - lo) / (hi - lo) * plot_w)

    for tick in (0.001, 0.01, 0.1, 0.5, 1, 2, 3, 10, 100):
        x = x_of(tick)
        draw.line([(x, top - 6), (x, top + row_h * len(rows))], fill="#dddddd")
        draw.text((x - 8, top + row_h * len(rows) + 4), f"{tick:g}x", fill="black", font=font)
    one = x_of(1.0)
    for i, (label, ratio, need) in enumerate(rows):
        y = top + i * row_h
        draw.text((10, y + 4), label[:70], fill="black", font=font)
        colour = "#4a78c2" if need is None else ("#3a9a3a" if ratio >= need else "#c83a3a")
        x = x_of(ratio)
        draw.rectangle([(min(one, x), y + 5), (max(one, x), y + row_h - 5)], fill=colour)
        draw.text((max(one, x) + 4, y + 4), f"{ratio:.2f}x", fill="black", font=font)
        if need is not None:
            xn = x_of(need)
            draw.line([(xn, y + 1), (xn, y + row_h - 1)], fill="black", width=3)
    draw.line([(one, top - 6), (one, top + row_h * len(rows))], fill="black")
    if alloc:
        _alloc_panel(draw, alloc, top + row_h * len(rows) + 60, width, font)
    img.save(path)


def _alloc_panel(draw: Any, flat: dict[str, dict[str, Any]], y0: int, width: int,
                 font: Any) -> None:
    draw.text((10, y0), "6. allocation: grow (truncate -s half the pool) in ms by pool size, "
              "log scale; dashed = 10 ms target", fill="black", font=font)
    left, top, plot_w, plot_h = 120, y0 + 30, width - 400, 250
    series = []
    for dpage, per in flat.items():
        for key in ("grow_first_ms", "grow_reuse_ms"):
            if key in per:
                series.append((f"{dpage} {key.removesuffix('_ms')}", per[key]))
    pools = sorted({int(p) for _, by in series for p in by})
    if not pools:
        return
    values = [v for _, by in series for v in by.values()]
    lo = math.log10(max(min(values + [10.0]), 1e-3)) - 0.2
    hi = math.log10(max(values + [10.0])) + 0.2

    def y_of(v: float) -> int:
        return int(top + plot_h - (math.log10(max(v, 1e-3)) - lo) / (hi - lo) * plot_h)

    def x_of(pool: int) -> int:
        if len(pools) == 1:
            return left + plot_w // 2
        return left + int(pools.index(pool) / (len(pools) - 1) * plot_w)

    draw.rectangle([(left, top), (left + plot_w, top + plot_h)], outline="black")
    for pool in pools:
        draw.text((x_of(pool) - 20, top + plot_h + 6), f"{pool / GIB:g} GiB", fill="black",
                  font=font)
    for exp in range(math.floor(lo), math.ceil(hi) + 1):
        v = 10.0 ** exp
        if lo <= exp <= hi:
            draw.text((10, y_of(v) - 8), f"{v:g} ms", fill="black", font=font)
            draw.line([(left, y_of(v)), (left + plot_w, y_of(v))], fill="#eeeeee")
    y10 = y_of(10.0)
    for x in range(left, left + plot_w, 12):
        draw.line([(x, y10), (x + 6, y10)], fill="red", width=2)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for i, (name, by) in enumerate(series):
        colour = colours[i % len(colours)]
        points = [(x_of(int(p)), y_of(v)) for p, v in sorted(by.items(), key=lambda t: int(t[0]))]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse([(x - 4, y - 4), (x + 4, y + 4)], fill=colour)
        draw.text((left + plot_w + 20, top + i * 22), name, fill=colour, font=font)
