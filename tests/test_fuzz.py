"""The fuzz targets of tests/fuzz/targets.py (issue #16), in two ways.

- Every input of each corpus, including each crash that fuzzing found and that was
  fixed (the ``crash-*`` files), is handled as its target's contract says.
- Each target is fuzzed by tools/fuzz (atheris, coverage-guided) for a bounded time,
  FUZZ_SECONDS each; ``tools/fuzz TARGET --time S`` runs one for longer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fuzz.targets import TARGETS

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "fuzz" / "corpus"
FUZZ_SECONDS = 30


@pytest.mark.parametrize("name", TARGETS)
def test_every_corpus_input_is_handled(name: str) -> None:
    """Each corpus input, replayed once, ends as the target requires."""
    check = TARGETS[name].build()
    inputs = sorted((CORPUS / name).iterdir())
    assert len(inputs) >= 10, f"the {name} corpus is thin: {inputs}"
    failed = []
    for path in inputs:
        try:
            check(path.read_bytes())
        except Exception as exc:  # any exception is the failure being looked for
            failed.append(f"{path.name}: {type(exc).__name__}: {exc}")
    assert not failed, "\n".join(failed)


@pytest.mark.timeout(FUZZ_SECONDS + 90)
@pytest.mark.parametrize("name", TARGETS)
def test_fuzzing_finds_no_crash(name: str, tmp_path: Path) -> None:
    """tools/fuzz runs the target for FUZZ_SECONDS from its corpus: no input raises or
    takes more than a second."""
    done = subprocess.run([sys.executable, str(REPO / "tools" / "fuzz"), name, "--time",
                           str(FUZZ_SECONDS), "--crashes", str(tmp_path)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert "no crash" in done.stdout, done.stdout
    assert not list(tmp_path.iterdir()), "a crash was saved"
