"""docs/algorithms.md is the reference the code points to, so its references must stay true.

Every "§N" in the code, tests, benchmarks, protos, configs and docs (the sign is used for nothing else here) must
name a numbered section of docs/algorithms.md, written "docs/algorithms.md §N" (older forms such as
"algorithms.md section N" would escape the check and are refused); the fusion modules' docstrings point to it; and
the team's shared specification, which a user of this repository does not have, is referred to nowhere.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "algorithms.md"
THIS = Path(__file__).resolve()
SCANNED_DIRS = ("logitfusion", "tests", "bench", "protos", "docs", "configs", "k8s")
SCANNED_FILES = ("README.md", "Makefile")
SUFFIXES = {".py", ".md", ".proto", ".yaml", ".yml", ".toml", ".txt"}
SKIPPED_DIRS = {"__pycache__", ".venv", ".git"}
SKIPPED_TREES = ("logitfusion/v1/", "logitfusion/models/zoo/data/")  # generated protobuf code, model files

SECTION_HEADING = re.compile(r"^## (\d+)\. \S", re.MULTILINE)
SECTION_REF = re.compile(r"§\s*(\d+)")
OLD_FORM = re.compile(r"algorithms\.md\)?,?\s*\(?(?:sections?\s*\d|s\.\s*\d)", re.IGNORECASE)
SHARED_SPEC = "ALGORITHMS.md"  # case matters: docs/algorithms.md is the project's own page

# Modules whose docstring explains a part of the math: each points its reader to the page.
DOCUMENTED_MODULES = (
    "logitfusion/fusion/__init__.py",
    "logitfusion/fusion/recipe.py",
    "logitfusion/fusion/presets.py",
    "logitfusion/fusion/dlf.py",
    "logitfusion/fusion/candidates.py",
    "logitfusion/fusion/routing.py",
    "logitfusion/fusion/sampling.py",
    "logitfusion/fusion/speculative.py",
    "logitfusion/models/vocab.py",
    "logitfusion/eval/metrics.py",
)


def sections(doc_text: str) -> list[int]:
    """The numbers of the page's "## N. Title" headings, in order."""
    return [int(n) for n in SECTION_HEADING.findall(doc_text)]


def bad_references(text: str, known: set[int], where: str) -> list[str]:
    """'where:line: ...' for every §N that names no section and every reference in an unchecked form."""
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in SECTION_REF.finditer(line):
            if int(m.group(1)) not in known:
                problems.append(f"{where}:{lineno}: {m.group(0)} is not a section of docs/algorithms.md")
        for m in OLD_FORM.finditer(line):
            problems.append(f"{where}:{lineno}: {m.group(0)!r}: write 'docs/algorithms.md §N'")
    return problems


def scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    for top in SCANNED_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT)
            if not path.is_file() or path.suffix not in SUFFIXES or path == THIS:  # this file shows bad examples
                continue
            if SKIPPED_DIRS.intersection(rel.parts) or rel.as_posix().startswith(SKIPPED_TREES):
                continue
            files.append(path)
    return files


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def test_sections_are_numbered_one_to_n_in_order():
    numbers = sections(read(DOC))
    assert len(numbers) >= 10, f"docs/algorithms.md has only {len(numbers)} numbered '## N. Title' sections"
    assert numbers == list(range(1, len(numbers) + 1)), f"section numbers out of order: {numbers}"


def test_every_section_reference_names_an_existing_section():
    known = set(sections(read(DOC)))
    problems = []
    files = scanned_files()
    assert len(files) > 50, f"the scan found only {len(files)} files under {ROOT}"
    for path in files:
        text = read(path)
        where = str(path.relative_to(ROOT))
        problems += bad_references(text, known, where)
        if "§" in text and path != DOC and "docs/algorithms.md" not in text:
            problems.append(f"{where}: uses § without naming docs/algorithms.md")
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_missing_section_and_an_old_form():
    known = {1, 2, 3}
    assert bad_references("see docs/algorithms.md §3 and §2", known, "x") == []
    missing = bad_references("ok\nsee docs/algorithms.md §12", known, "x.py")
    assert missing == ["x.py:2: §12 is not a section of docs/algorithms.md"]
    assert len(bad_references("(docs/algorithms.md section 4)", known, "x")) == 1
    assert len(bad_references("docs/algorithms.md s.3", known, "x")) == 1


def test_the_shared_specification_is_referred_to_nowhere():
    hits = []
    for path in scanned_files():  # without this file, which names it to look for it
        for lineno, line in enumerate(read(path).splitlines(), 1):
            if SHARED_SPEC in line:
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not hits, "refer to docs/algorithms.md §N instead:\n" + "\n".join(hits)


def test_readme_and_the_fusion_modules_point_to_the_page():
    assert "[docs/algorithms.md](docs/algorithms.md)" in read(ROOT / "README.md")
    missing = []
    for rel in DOCUMENTED_MODULES:
        doc = ast.get_docstring(ast.parse(read(ROOT / rel))) or ""
        if "docs/algorithms.md" not in doc or not SECTION_REF.search(doc):
            missing.append(rel)
    assert not missing, f"module docstrings that name no section of docs/algorithms.md: {missing}"
