"""Check every internal link and anchor of the docs, offline (``make docs`` runs it after the build).

Two views, both needed:

* **The sources, as GitHub shows them**: every relative link in README.md and the pages under
  docs/ names a file of the repository, and its ``#anchor`` a heading of that file (GitHub's
  anchors: lower case, punctuation dropped, each space a hyphen). So the README's links into
  docs/ and the pages' links back to ``../README.md#...`` hold in both directions. A link to a
  page listed under ``extra.pending`` in mkdocs.yml (a page another branch brings) is accepted
  while that file is missing, without its anchor. A reference-style link (``[text][label]``)
  needs its ``[label]: url`` line: mkdocs would resolve it as a cross-reference, GitHub would not.
* **The built site** (``site/``): every ``href``/``src`` of every HTML page that is not an
  external URL names a file of the site, and its fragment an ``id`` in that file; this covers
  the API reference's cross-references and the home page made from the README.

``python scripts/check_docs_links.py [--site site]``: prints each broken link, exit 1 if any.
``--sources-only`` skips the site (no build needed; tests/test_docs.py does that).
"""

from __future__ import annotations

import argparse
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
COMMENT = re.compile(r"<!--.*?-->", re.S)
MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
PENDING = re.compile(r"^ {4}([\w/.-]+\.md):", re.M)
REF_LINK = re.compile(r"\[([^\[\]]+)\]\[([^\[\]]*)\]")


def github_slug(heading: str) -> str:
    """The anchor GitHub (and the site's toc, see mkdocs.yml) gives a Markdown heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (GitHub numbers repeats -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("", path.read_text())):
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def markdown_links(path: Path) -> list[str]:
    """The link targets of a Markdown file, code and comments left out."""
    text = COMMENT.sub("", FENCE.sub("", path.read_text()))
    return MD_LINK.findall(CODE.sub("", text))


def undefined_references(path: Path) -> list[str]:
    """Reference-style links (``[text][label]``) without a ``[label]: url`` line: GitHub shows them raw."""
    raw = path.read_text()
    text = CODE.sub("", COMMENT.sub("", FENCE.sub("", raw)))
    defined = {m.lower() for m in re.findall(r"^ {0,3}\[([^\]]+)\]:", raw, re.M)}
    return [m.group(0) for m in REF_LINK.finditer(text) if (m.group(2) or m.group(1)).lower() not in defined]


def pending_pages(root: Path = ROOT) -> set[Path]:
    """The pages mkdocs.yml lists under ``extra.pending`` (their paths in the repository)."""
    text = (root / "mkdocs.yml").read_text()
    section = text.split("\n  pending:\n", 1)[1] if "\n  pending:\n" in text else ""
    section = re.split(r"^\S|^  \S", section, maxsplit=1, flags=re.M)[0]
    return {(root / "docs" / p).resolve() for p in PENDING.findall(section)}


def check_sources(root: Path = ROOT) -> list[str]:
    """Broken relative links of README.md and docs/**/*.md, as ``file: target (why)``."""
    pending = pending_pages(root)
    errors = []
    for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        errors += [f"{page.relative_to(root)}: {ref} (no [label]: line; GitHub shows it raw)"
                   for ref in undefined_references(page)]
        for target in markdown_links(page):
            url = urlsplit(target)
            if url.scheme or target.startswith("//"):
                continue
            where = f"{page.relative_to(root)}: {target}"
            dest = (page.parent / unquote(url.path)).resolve() if url.path else page.resolve()
            if not dest.exists():
                if dest not in pending:
                    errors.append(f"{where} (no such file)")
                continue
            if url.fragment and dest.suffix == ".md" and url.fragment not in anchors_of(dest):
                errors.append(f"{where} (no heading with that anchor)")
    return errors


class _Page(HTMLParser):
    """The ids and the link targets of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for key in ("id", "name"):
            if values.get(key) and (key == "id" or tag == "a"):
                self.ids.add(values[key])
        for key in ("href", "src"):
            if values.get(key) and tag in ("a", "img", "link", "script"):
                self.links.append(values[key])


def _parse(path: Path, cache: dict[Path, _Page]) -> _Page:
    if path not in cache:
        page = _Page()
        page.feed(path.read_text(errors="replace"))
        cache[path] = page
    return cache[path]


def check_site(site: Path) -> list[str]:
    """Broken internal links of the built site, as ``page: target (why)``."""
    cache: dict[Path, _Page] = {}
    errors = []
    for html in sorted(site.rglob("*.html")):
        for target in _parse(html, cache).links:
            url = urlsplit(target)
            if url.scheme or target.startswith("//"):
                continue  # external: not checked offline
            where = f"{html.relative_to(site)}: {target}"
            base = site if url.path.startswith("/") else html.parent  # 404.html links from the root
            dest = (base / unquote(url.path).lstrip("/")).resolve() if url.path else html
            if dest.is_dir():
                dest = dest / "index.html"
            if not dest.exists():
                errors.append(f"{where} (no such file)")
            elif url.fragment and dest.suffix == ".html" and unquote(url.fragment) not in _parse(dest, cache).ids:
                errors.append(f"{where} (no such id)")
    return errors


def main(argv: list[str] | None = None) -> int:
    """Check the sources and the built site; print what is broken."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", type=Path, default=ROOT / "site", help="the built site (default site/)")
    ap.add_argument("--sources-only", action="store_true", help="check README.md and docs/ only")
    args = ap.parse_args(argv)
    errors = check_sources()
    pages = 0
    if not args.sources_only:
        if not (args.site / "index.html").exists():
            print(f"no built site at {args.site}: run `make docs`", file=sys.stderr)
            return 1
        errors += check_site(args.site)
        pages = len(list(args.site.rglob("*.html")))
    for line in errors:
        print(f"broken link: {line}", file=sys.stderr)
    print(f"links: {len(errors)} broken (sources" + (f" and {pages} HTML pages)" if pages else ")"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
