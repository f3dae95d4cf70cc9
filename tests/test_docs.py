"""README.md and docs/*.md link only to files inside the repository, and every relative
link resolves (a user's clone has nothing outside it)."""
from __future__ import annotations

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
