"""The README documents what the code offers."""

from __future__ import annotations

from pathlib import Path

from dmemfs_fuse.host.options import OPTIONS

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_documents_every_mount_option() -> None:
    text = README.read_text()
    for opt in OPTIONS:
        assert f"`{opt.name}" in text, f"README does not document {opt.name}"
