"""The README and docs/ stay true to the code: every `clipsnail ...` command line in their code blocks parses with
the real parser, their links lead to files and headings that exist, the README stays short, and nothing in the
repository points to a path outside it."""

import re
import shlex
from pathlib import Path

import pytest

from clipsnail.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_BYTES = 15_000


def code_blocks(text: str) -> list[str]:
    """The contents of the fenced code blocks of a Markdown text."""
    return re.findall(r"^ *```[^\n]*\n(.*?)^ *```", text, flags=re.S | re.M)


def logical_lines(block: str) -> list[str]:
    """The lines of a code block with backslash continuations joined."""
    lines, pending = [], ""
    for raw in block.splitlines():
        line = raw.strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def clipsnail_args(line: str) -> list[str] | None:
    """The arguments after `clipsnail` (or `python -m clipsnail`, `.venv/bin/clipsnail`, `-m clipsnail` under
    torchrun) of a shell line, up to a pipe; None for a line that does not run clipsnail."""
    line = line.removeprefix("$ ")
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    for i, word in enumerate(words):
        runs = word == "clipsnail" or word.endswith("/clipsnail")
        runs = runs and (i == 0 or words[i - 1] == "-m")
        if runs:
            args = words[i + 1:]
            return args[: args.index("|")] if "|" in args else args
    return None


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in PAGES:
        for block in code_blocks(page.read_text()):
            for line in logical_lines(block):
                args = clipsnail_args(line)
                if args is not None:
                    found.append((page.relative_to(ROOT).as_posix(), line, args))
    return found


def test_the_pages_show_commands():
    pages = {page for page, _, _ in documented_commands()}
    assert "README.md" in pages and "docs/search.md" in pages and "docs/training.md" in pages
    assert len(documented_commands()) > 60


@pytest.mark.parametrize("page,line,args", documented_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_documented_command_parses(page, line, args):
    if any("$" in a for a in args):
        pytest.skip("a placeholder the shell would expand")
    try:
        build_parser().parse_args(args)
    except SystemExit as e:
        assert e.code == 0, f"{page}: {line}"  # --help and --version exit 0


def test_no_stale_flag_spellings():
    """`classify train --model` was renamed `--arch` (the old spelling warns); the docs use the new one."""
    for page, line, args in documented_commands():
        if args[:2] == ["classify", "train"]:
            assert "--model" not in args, f"{page}: {line}"


def test_the_readme_is_short():
    assert (ROOT / "README.md").stat().st_size <= README_MAX_BYTES


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^ *```.*?^ *```", "", page.read_text(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_links_lead_to_files_and_headings_that_exist():
    for page in PAGES:
        text = re.sub(r"^ *```.*?^ *```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.relative_to(ROOT)}: {target}"
            assert ROOT in linked.parents or linked == ROOT, f"{page.relative_to(ROOT)}: {target} leaves the repository"
            if anchor and linked.suffix == ".md":
                assert anchor in anchors(linked), f"{page.relative_to(ROOT)}: {target}: no such heading"


# Spelled so that the pattern's own text does not match it (an escaped slash is a slash to `re`).
OUTSIDE = re.compile(r"\.\.\/shared\b|(?<![\w.])\/work\/")


def repository_texts() -> list[Path]:
    files = [p for p in ROOT.glob("*.md")]
    files += [p for p in (ROOT / "docs").rglob("*.md")]
    for folder in ("src", "tests", "bench"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file()
                  and p.suffix in {".py", ".md", ".yaml", ".yml", ".json", ".txt", ".toml", ".html", ".cfg"}
                  and not any(part.endswith(".egg-info") or part == "__pycache__" for part in p.parts)]
    files += [ROOT / "pyproject.toml", ROOT / "Makefile", ROOT / ".ci" / "run"]
    return [p for p in files if p.is_file()]


def test_nothing_refers_to_a_path_outside_the_repository():
    offenders = []
    for path in repository_texts():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert offenders == []


def test_the_docs_point_to_the_packaged_configs():
    """configs/ moved into the package: no page shows the old `configs/NAME.yaml` path."""
    for page in PAGES:
        assert not re.search(r"(?<![/\w])configs/\w+\.yaml", page.read_text()), page.relative_to(ROOT)
