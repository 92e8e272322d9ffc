"""The repository's documents: every design-doc citation points at docs/DESIGN.md and at a section
it has, nothing cites files outside the repository, and the README's Python snippets parse."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "README.md"] + [
    path for folder in ("bytheway_kernels", "csrc", "benchmarks", "tests", "python", "docs")
    for path in sorted((REPO / folder).rglob("*"))
    if path.suffix in {".py", ".cpp", ".h", ".md", ".sh"} and path.name != "test_docs.py"
]
#: A relative path that climbs out of the folder it is written in (`../name`).
PARENT_PATH = re.compile(r"(?<![\w./])\.\./[\w.-]+")
CITATION = re.compile(r"(\S*DESIGN\.md)[^\n]{0,12}?(?:sections?|§)\s*(\d+)(?:\s*[-–]\s*(\d+))?")


def _design_sections():
    text = (REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    return {int(number) for number in re.findall(r"^## (\d+)\.", text, flags=re.MULTILINE)}


def test_design_citations_point_into_docs_design():
    sections = _design_sections()
    assert sections == set(range(1, max(sections) + 1))
    cited = 0
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for cited_path in PARENT_PATH.findall(text):  # a relative path must stay inside the repo
            assert REPO in (path.parent / cited_path).resolve().parents, (path, cited_path)
        for name in re.findall(r"\S*DESIGN\.md", text):
            assert name.strip("`([*").endswith("docs/DESIGN.md") or path.parent.name == "docs", (path, name)
        for _, first, last in CITATION.findall(text):
            for number in range(int(first), int(last or first) + 1):
                assert number in sections, f"{path} cites DESIGN.md section {number}"
                cited += 1
    assert cited > 0


def test_readme_python_snippets_parse():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    snippets = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert snippets
    for snippet in snippets:
        ast.parse(snippet)
