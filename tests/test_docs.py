"""The README stays a short entry point, and what it and docs/*.md name (pages, paths, targets, modules) exists."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_BUDGET_BYTES = 8 * 1024  # a newcomer's page: the details belong in docs/
# where a path named in the docs must live (outputs/, models/, saves/ are made by runs)
TRACKED_ROOTS = (
    "benchmarks",
    "configs",
    "data",
    "docs",
    "examples",
    "galore-torch",
    "results",
    "scripts",
    "src",
    "tests",
)
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(map(re.escape, TRACKED_ROOTS))})/[\w./-]*)")


def _code(text: str) -> list[str]:
    """The fenced blocks and inline code spans of a Markdown page: where commands and paths are written."""
    fenced = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    rest = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S)
    return fenced + re.findall(r"`([^`\n]+)`", rest)


def _links(text: str) -> list[str]:
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://", target)]


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(encoding="utf-8"), re.M))


def test_the_readme_stays_under_its_size_budget():
    size = len(README.read_bytes())
    assert size <= README_BUDGET_BYTES, f"README.md is {size} bytes; move details into docs/ ({README_BUDGET_BYTES})"


def test_the_readme_links_every_docs_page_and_each_link_exists():
    links = set(_links(README.read_text(encoding="utf-8")))
    for link in links:
        assert (REPO / link).exists(), f"README.md links {link}, which does not exist"
    unlinked = [page.name for page in PAGES[1:] if f"docs/{page.name}" not in links]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_relative_links_of_a_page_exist(page):
    for link in _links(page.read_text(encoding="utf-8")):
        target = link.split("#", 1)[0]
        assert (page.parent / target).exists(), f"{page.name} links {link}, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_paths_a_page_names_exist(page):
    missing = []
    for code in _code(page.read_text(encoding="utf-8")):
        for match in PATH.finditer(code):
            path = match.group(1).rstrip(".")
            if code[match.end() : match.end() + 1] in ("{", "*", "<") or path.endswith("_"):
                continue  # a pattern (`results/bench_methods_{tiny,small}.md`), not one path
            if not (REPO / path).exists():
                missing.append(path)
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_make_targets_a_page_names_exist(page):
    named = {
        target for code in _code(page.read_text(encoding="utf-8")) for target in re.findall(r"\bmake ([\w-]+)", code)
    }
    assert named <= _makefile_targets(), (
        f"{page.name} names make targets the Makefile lacks: {named - _makefile_targets()}"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_python_modules_a_page_runs_exist(page):
    missing = []
    for code in _code(page.read_text(encoding="utf-8")):
        for module in re.findall(r"python -m ([\w.]+)", code):
            if module in ("pytest",):
                continue
            parts = module.split(".")
            places = [REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath("src", *parts).with_suffix(".py")]
            if not any(place.is_file() for place in places):
                missing.append(module)
    assert not missing, f"{page.name} runs modules that do not exist: {missing}"


def test_the_readme_test_command_is_what_ci_runs():
    readme = README.read_text(encoding="utf-8")
    assert "make install && make test" in readme
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert [line for line in ci if line.startswith("make ")] == ["make install", "make lint", "make test"]
