"""The package's layers: each module imports only from its own layer and the layers below.

The order, from the bottom up, is the README's ("Layout").  The modules at the top of
the package (errors, libc, rundir, sizes, tasks) are foundations that every layer may
use; they import nothing of the package but errors.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dmemfs_fuse"
LAYERS = ["memory", "alloc", "files", "metadata", "adapter", "insight", "host"]
FOUNDATIONS = {"errors", "libc", "rundir", "sizes", "tasks", "__init__"}


def rank(module: tuple[str, ...]) -> int:
    """The layer of *module* (its path inside the package), -1 for a foundation (and for
    the package itself)."""
    if not module:
        return -1
    if module[0] in LAYERS:
        return LAYERS.index(module[0])
    assert module[0] in FOUNDATIONS, f"dmemfs_fuse.{'.'.join(module)} is in no layer"
    return -1


def imports(path: Path, package: Path) -> list[tuple[int, tuple[str, ...]]]:
    """(line, module path inside the package) of each import of the package in *path*."""
    here = path.relative_to(package).with_suffix("").parts
    found: list[tuple[int, tuple[str, ...]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                and node.args[0].value.split(".")[0] == package.name
                and ast.unparse(node.func) in {"importlib.import_module", "import_module",
                                               "__import__"}):
            found.append((node.lineno, tuple(node.args[0].value.split(".")[1:])))
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, tuple(alias.name.split(".")[1:])) for alias in node.names
                      if alias.name.split(".")[0] == package.name]
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        module = (node.module or "").split(".") if node.module else []
        if node.level:
            base = list(here[: len(here) - node.level])
        elif module[:1] == [package.name]:
            base, module = [], module[1:]
        else:
            continue
        target = (*base, *module)
        if not target or (len(target) == 1 and target[0] in LAYERS):
            # "from .. import __version__", "from ..memory import numa": each name a module
            found += [(node.lineno, (*target, alias.name)) for alias in node.names]
        else:
            found.append((node.lineno, target))
    return found


def upward(package: Path) -> list[str]:
    """Every import in *package* that goes up a layer (or out of a foundation)."""
    wrong = []
    for path in sorted(package.rglob("*.py")):
        mine = rank(path.relative_to(package).with_suffix("").parts)
        for line, target in imports(path, package):
            if target in {(), ("__version__",)}:
                continue  # the package itself, or its version from its own __init__
            if rank(target) > mine or (mine == -1 and target[0] != "errors"):
                wrong.append(f"{path.relative_to(package.parent)}:{line} imports "
                             f"{package.name}.{'.'.join(target)}")
    return wrong


def test_every_module_imports_only_its_own_layer_and_those_below() -> None:
    assert len(list(PACKAGE.rglob("*.py"))) > 40, "the package was not found"
    wrong = upward(PACKAGE)
    assert not wrong, "imports that go up a layer:\n" + "\n".join(wrong)


def test_the_check_finds_each_form_of_an_upward_import(tmp_path: Path) -> None:
    """The check itself, on a small package with one upward import of each form."""
    package = tmp_path / "dmemfs_fuse"
    for layer in ("memory", "host"):
        (package / layer).mkdir(parents=True)
    (package / "errors.py").write_text("")
    (package / "host" / "options.py").write_text("from ..memory import numa\n")
    (package / "memory" / "numa.py").write_text("from ..errors import ConfigError\n")
    (package / "memory" / "region.py").write_text(
        "from ..host.options import X\nfrom ..host import options\n"
        "import dmemfs_fuse.host.cli as cli\nfrom dmemfs_fuse.host.plan import Y\n"
        "from . import numa\nimport dmemfs_fuse\n"
        "if TYPE_CHECKING:\n    from ..host.daemon import Z\n"
        "def f():\n    from ..host import notify\n"
        "    return importlib.import_module('dmemfs_fuse.host.manpage')\n")
    (package / "memory" / "bdi.py").write_text("from ..errors import E\n")
    found = sorted(upward(package), key=lambda text: int(text.split(":")[1].split()[0]))
    assert found == [
        f"dmemfs_fuse/memory/region.py:{line} imports dmemfs_fuse.host.{name}"
        for line, name in ((1, "options"), (2, "options"), (3, "cli"), (4, "plan"),
                           (8, "daemon"), (10, "notify"), (11, "manpage"))]
