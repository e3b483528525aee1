"""Every relative link in README.md and docs/ points at a file that exists and, with ``#anchor``, at a heading in it.

Anchors are GitHub's: the heading lower-cased, punctuation other than ``-`` and ``_`` dropped, spaces as ``-``,
and ``-1``, ``-2`` ... for repeated headings.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown`` (fenced code skipped)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    text = doc.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}")
    assert broken == [], "\n".join(broken)


def test_the_anchor_rule_matches_github() -> None:
    heading = "## Real-shaped models (bench/scale)\n"
    text = "# A (b), c\n" + heading + "```\n# not a heading\n```\n" + heading
    assert anchors(text) == {"a-b-c", "real-shaped-models-benchscale", "real-shaped-models-benchscale-1"}
