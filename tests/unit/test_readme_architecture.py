"""The README's architecture section matches the tree: every folder and module it names exists
where it says, and every module of `src/` is named, so a newcomer's map is never stale."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SOURCE_FILE = re.compile(r"[\w.]+\.(?:py|c|h)\b")
# A path a sentence names: folders and a file, e.g. `adapters/worker/awq/qlinear.py`.
NAMED_PATH = re.compile(r"`((?:[\w.]+/)+[\w.]+\.(?:py|c|h))")


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n{title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _tree_block() -> list[str]:
    section = _section("## Architecture")
    block = section.split("```\n", 2)[1]
    return [line for line in block.splitlines() if line.strip()]


def _tree_entries() -> dict[Path, set[str]]:
    """Each folder of the tree and the file names its lines mention. A line whose first word
    ends in `/` opens a folder at its indentation (two spaces a level); other lines continue
    the folder above them."""
    folders: dict[Path, set[str]] = {}
    stack: list[tuple[int, Path]] = []
    current: Path | None = None
    for line in _tree_block():
        indent = len(line) - len(line.lstrip())
        first, _, rest = line.strip().partition(" ")
        if first.endswith("/"):
            while stack and stack[-1][0] >= indent:
                stack.pop()
            parent = stack[-1][1] if stack else ROOT
            current = parent / first.rstrip("/")
            stack.append((indent, current))
            folders.setdefault(current, set())
            text = rest
        else:
            text = line
        assert current is not None, f"a line before any folder: {line!r}"
        folders[current].update(SOURCE_FILE.findall(text))
    return folders


def _modules_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


def test_every_folder_the_tree_names_exists() -> None:
    missing = [str(f.relative_to(ROOT)) for f in _tree_entries() if not f.is_dir()]
    assert not missing, f"the README's tree names folders that do not exist: {missing}"


def test_every_file_the_tree_names_is_in_its_folder() -> None:
    wrong = [
        f"{folder.relative_to(ROOT)}/{name}"
        for folder, names in _tree_entries().items()
        if folder.is_dir()
        for name in sorted(names - _modules_in(folder))
    ]
    assert not wrong, f"the README's tree names files that are not where it says: {wrong}"


def test_every_module_of_src_is_in_the_tree() -> None:
    entries = _tree_entries()
    unnamed = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "src").rglob("*.py"))
        if path.name not in ("__init__.py", "__main__.py")
        and path.name not in entries.get(path.parent, set())
    ]
    assert not unnamed, f"modules the README's architecture tree does not name: {unnamed}"


def test_every_folder_of_src_is_in_the_tree() -> None:
    entries = _tree_entries()
    folders = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "src").rglob("*"))
        if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))
    ]
    unnamed = [f for f in folders if ROOT / f not in entries]
    assert not unnamed, f"packages the README's architecture tree does not name: {unnamed}"


@pytest.mark.parametrize("title", ["### The path of one request"])
def test_the_paths_a_walkthrough_names_exist(title: str) -> None:
    paths = set(NAMED_PATH.findall(_section(title)))
    assert paths, "the walkthrough names no paths: the test would check nothing"
    files = [
        f.relative_to(ROOT).as_posix()
        for top in ("src", "tests", "benchmarks")
        for f in (ROOT / top).rglob("*")
        if f.is_file()
    ]
    # A path is named from src/ or the repository's root, or shortened after a path above it
    # (`engine/engine.py` after `application/worker/...`).
    missing = sorted(p for p in paths if not any(f == p or f.endswith("/" + p) for f in files))
    assert not missing, f"the README names files that do not exist: {missing}"
