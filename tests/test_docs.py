"""README.md and docs/*.md link only to files inside the repository, and every relative
link resolves (a user's clone has nothing outside it); every ``prdit_fast.x`` module or
class that they or a docstring name exists."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# [text](target) and [text](target "title"); images too
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    links = [m.group(1) for m in LINK.finditer(text)]
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link) and not link.startswith("#")]


def test_every_relative_link_resolves_inside_the_repository():
    documents = _documents()
    assert {"architecture.md", "model.md", "gpu-session.md", "adding-an-op.md"} <= {p.name for p in documents}
    checked = 0
    for doc in documents:
        for link in _relative_links(doc):
            target = (doc.parent / link.split("#", 1)[0]).resolve()
            assert target.is_relative_to(ROOT), f"{doc.name}: {link} leaves the repository"
            assert target.exists(), f"{doc.name}: {link} does not resolve ({target})"
            checked += 1
    assert checked >= 8  # the README's and the docs' own links were read


def test_the_link_reader_sees_links(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text('see [a](docs/a.md), [b](../shared/b.md "t"), ![c](c.png), [d](https://x.org), [e](#top)\n'
                   "```\n[not](a link.md)\n```\n")
    assert _relative_links(doc) == ["docs/a.md", "../shared/b.md", "c.png"]


# prdit_fast.NAME[.NAME...]: a module, or a module's class / function / attribute
DOTTED_NAME = re.compile(r"\bprdit_fast(?:\.[A-Za-z_]\w*)+")


def _resolves(dotted: str) -> bool:
    """Whether the longest importable module prefix of ``dotted`` has the rest as attributes."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for attribute in parts[end:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def _docstrings(path: Path) -> str:
    tree = ast.parse(path.read_text())
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return "\n".join(doc for node in ast.walk(tree) if isinstance(node, kinds) and (doc := ast.get_docstring(node)))


def test_every_prdit_fast_name_in_the_docs_and_docstrings_exists():
    """Every ``prdit_fast.x.y`` named by README.md, docs/*.md or a docstring of the package
    is a module, or an attribute of one, that exists."""
    texts = {path.relative_to(ROOT): path.read_text() for path in _documents()}
    texts |= {path.relative_to(ROOT): _docstrings(path) for path in sorted((ROOT / "prdit_fast").rglob("*.py"))}
    named = {(where, name) for where, text in texts.items() for name in DOTTED_NAME.findall(text)}
    assert len(named) > 50
    missing = sorted(f"{where}: {name}" for where, name in named if not _resolves(name))
    assert not missing, "names that do not exist: " + "; ".join(missing)


def test_the_name_check_finds_a_missing_module_and_class():
    assert _resolves("prdit_fast.engine.GuidedSampler") and _resolves("prdit_fast.ops.unfold3d")
    assert not _resolves("prdit_fast.guided.GuidedSampler")
    assert not _resolves("prdit_fast.engine.NoSuchSampler")
