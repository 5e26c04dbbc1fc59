"""The README's "Layout changes" examples run as they stand: each ```python block of that
section is executed in a fresh namespace, and its asserts are the check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Layout changes real models go through"


def _blocks() -> list[tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    section = text[start:end]
    titles = re.findall(r"^### (.+)$", section, flags=re.M)
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == len(titles) >= 4, "one runnable example a change kind"
    return list(zip(titles, blocks))


@pytest.mark.parametrize(("title", "code"), _blocks(), ids=[t for t, _ in _blocks()])
def test_the_readme_example_runs(title: str, code: str) -> None:
    exec(compile(code, f"README.md: {title}", "exec"), {})  # our own README, not a file's string
