"""The repository stands alone: its documents point at nothing outside it, and the README's
layout is the tree."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = [
    (re.compile(r"\.\./shared"), "a path outside the repository"),
    (re.compile(r"seed log", re.I), "the seed runs' log, which users do not have"),
    (re.compile(r"DESIGN\.md|code-review\.md|stack-facts\.md|-audit\.md|tamper-field\.md"),
     "a design document outside the repository"),
    (re.compile(r"\bissues? #?\d+\b|\bthe (?:method|cluster|redesign) issue\b", re.I),
     "an issue of the team's tracker"),
]
TEXT = {".py", ".md", ".toml", ".yaml", ".yml", ".json", ".txt", ".cfg", ""}


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        return [ROOT / f for f in out]
    except (OSError, subprocess.CalledProcessError):  # an exported tree without git
        return [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts]


def test_nothing_in_the_repository_points_outside_it():
    found = []
    for path in _tracked():
        if path.suffix not in TEXT or path == Path(__file__).resolve() or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for pattern, what in OUTSIDE:
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def _layout() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    return [line.split()[0] for line in block.strip().splitlines() if line.strip()]


def test_the_readme_layout_is_the_tree():
    listed = _layout()
    for entry in listed:
        assert (ROOT / entry).exists(), f"README lists {entry}, which is not in the tree"
    modules = {f"raylens/{p.name}" for p in (ROOT / "raylens").glob("*.py")
               if p.name != "__init__.py"}
    assert modules - set(listed) == set(), "modules the README's layout leaves out"
    top = {p.name for p in _tracked() if p.is_file()
           for p in [Path(p.relative_to(ROOT).parts[0])]}
    top -= {".ci", ".gitignore", "Makefile", "README.md", "pyproject.toml"}
    named = {Path(entry).parts[0].rstrip("/") for entry in listed}
    assert top - named == set(), "top-level entries the README's layout leaves out"


def test_the_readme_is_a_users_document_of_about_200_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 210, len(lines)
    for doc in ("docs/method.md", "docs/results.md", "docs/guide.md", "docs/cluster.md",
                "docs/testing.md"):
        assert (ROOT / doc).is_file(), doc
    links = re.findall(r"\]\(((?:docs|dashboards)/[^)#]+)", "\n".join(lines))
    assert links and all((ROOT / link).exists() for link in links), links
