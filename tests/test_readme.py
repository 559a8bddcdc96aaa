"""The README stays a ten-minute read, and what it points to exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_fits_in_200_lines():
    assert len(README.splitlines()) <= 200


def test_every_file_the_readme_names_exists():
    named = set(re.findall(r"\b(?:docs|configs)/[\w./-]*\w", README))
    assert named, "the README links its docs and configs"
    assert [path for path in sorted(named) if not (ROOT / path).exists()] == []
