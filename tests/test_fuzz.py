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
    """Each corpus input, replayed once, ends as the target requires.  In a process of
    its own: the control target blocks SIGBUS and its kernel_error inputs queue one,
    which must not reach a later test's signalfd."""
    inputs = sorted((CORPUS / name).iterdir())
    assert len(inputs) >= 10, f"the {name} corpus is thin: {inputs}"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "fuzz"), "--replay", name],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-5000:]
    assert f"{len(inputs)} of {len(inputs)} corpus inputs pass" in done.stdout, done.stdout


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
