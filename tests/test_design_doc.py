"""docs/design.md stays a usable map: its table of contents lists every section, and every
citation of it in the tree (``docs/design.md §N``, ``DESIGN §N``) names a section it has."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
# Folders that are not the project's own text: environments, builds, caches.
SKIPPED_DIRS = {
    ".git",
    ".venv",
    "build",
    "dist",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".whl",
}
# Hidden folders hold caches and tools' state, except these, which are the project's.
PROJECT_DOT_DIRS = {".ci", ".github"}
SKIPPED_SUFFIXES = {".so", ".png", ".pyc", ".o", ".whl", ".gz", ".pt", ".pth"}

HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", re.M)
TOC_ENTRY = re.compile(r"^(\d+)\. \[(.+?)\]\(#(.+?)\)$", re.M)
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)")
# A citation: the file's name, then one or more section numbers, which may be separated by
# commas, dashes, "and", or a line break inside a comment (``//``, ``#``, ``*``).
CITATION = re.compile(
    r"(?:design\.md|\bDESIGN\b)(?:[\s,;:(/#*]|//)*"
    r"(§\s?\d+(?:\.\d+)*(?:(?:[\s,;–-]|and|//|#)*§\s?\d+(?:\.\d+)*)*)",
    re.I,
)


def sections() -> set[str]:
    return set(HEADING.findall(DESIGN.read_text()))


def tree_texts() -> dict[Path, str]:
    """Every text file of the project (not environments, builds or binaries)."""
    texts = {}
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if not path.is_file() or path.suffix in SKIPPED_SUFFIXES:
            continue
        folders = rel.parts[:-1]
        if any(
            part in SKIPPED_DIRS
            or part.endswith(".egg-info")
            or (part.startswith(".") and part not in PROJECT_DOT_DIRS)
            for part in folders
        ):
            continue
        try:
            texts[rel] = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def cited_sections(text: str) -> list[str]:
    """The section numbers of every design.md citation in ``text``."""
    return [n for match in CITATION.finditer(text) for n in SECTION.findall(match.group(1))]


def test_the_citation_pattern_reads_every_form_used():
    text = (
        "docs/design.md §5–§7, §10; (DESIGN §11) and docs/design.md\n// §5.6 on CuTe;"
        " design.md §2 and §3; the design of §9 is not a citation"
    )
    assert cited_sections(text) == ["5", "7", "10", "11", "5.6", "2", "3"]


def test_table_of_contents_lists_every_top_level_section_in_order():
    text = DESIGN.read_text()
    top = re.findall(r"^## (\d+)\. (.+)$", text, re.M)
    toc = [(number, title) for number, title, _ in TOC_ENTRY.findall(text)]
    assert toc == top
    assert [int(n) for n, _ in top] == list(range(1, len(top) + 1))


def test_every_design_citation_in_the_tree_names_an_existing_section():
    known = sections()
    texts = tree_texts()
    assert Path("README.md") in texts and Path("casa_kernels/ops/registry.py") in texts
    wrong = []
    cited = 0
    for rel, text in sorted(texts.items()):
        numbers = SECTION.findall(text) if rel == Path("docs/design.md") else cited_sections(text)
        cited += len(numbers)
        wrong += [f"{rel}: §{n}" for n in numbers if n not in known]
    assert cited > 20  # the scan sees the tree's citations
    assert not wrong, f"citations of sections docs/design.md does not have: {wrong}"


def test_the_readme_is_a_front_page_of_at_most_200_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; details belong in docs/design.md"
