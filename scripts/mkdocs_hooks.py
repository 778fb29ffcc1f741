"""mkdocs hooks of the reference site (named in ``mkdocs.yml``; ``make docs`` builds it).

* The README is the site's home page: ``index.md`` is generated from ``README.md``, its links
  into ``docs/`` made relative to the site (``docs/cli.md#x`` -> ``cli.md#x``). The pages link
  back to ``../README.md#anchor`` (which works on GitHub too); those links are pointed at the
  home page here.
* Pages other branches are still writing are listed under ``extra.pending`` in ``mkdocs.yml``.
  While such a file is missing a short stub stands in for it (so nav entries and links to it
  resolve); once the file exists it is used as is. An entry with a ``module`` is an API page:
  it is ``::: module`` once that module's source exists.
* A nav entry that names a folder (``experiments/``) lists that folder's pages: its
  ``README.md`` first, then the others by their title ("1. ...", "2. ..."), so a new generated
  page needs no nav edit. A pattern (``conformance*.md``) lists the pages it matches that the
  nav does not name elsewhere; ``"*.md"`` at the end catches a new page nobody placed yet (and
  says so in the build log), so a page landing from another branch never breaks the build.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.bnref")
ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(\]\(|\]: |src=\"|href=\")([^)\s\"#]*)(#[^)\s\"]*)?")


def readme_as_index(text: str) -> str:
    """README.md's text with its ``docs/...`` links relative to the site root."""

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if target.startswith("docs/"):
            target = target[len("docs/") :]
        return m.group(1) + target + (m.group(3) or "")

    return LINK.sub(fix, text)


def _module_exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _pending_text(page: str, entry: dict) -> str | None:
    """The generated text of a pending page, or None when its file exists (or its module does)."""
    module = entry.get("module")
    if module and _module_exists(module):
        return f"::: {module}\n    options:\n      heading_level: 1\n"
    title = entry.get("title", page)
    return (
        f"# {title}\n\n"
        f"!!! note \"Not written yet\"\n    This page arrives with {entry['from']}.\n"
    )


def on_files(files: Files, config, **kwargs) -> Files:
    """Add the home page (from README.md) and a stand-in for each missing pending page."""
    index = File.generated(config, "index.md", content=readme_as_index((ROOT / "README.md").read_text()))
    files.append(index)
    for page, entry in (config["extra"].get("pending") or {}).items():
        if files.get_file_from_path(page) is not None:
            continue
        text = _pending_text(page, entry)
        log.info("pending page %s: %s", page, "generated from its module" if entry.get("module") and
                 _module_exists(entry["module"]) else "stub")
        files.append(File.generated(config, page, content=text))
    return files


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    """Point links to the repository's README.md at the home page."""
    src = page.file.src_uri
    if src == "index.md":
        return markdown
    here = posixpath.dirname(src)

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if not target.endswith("README.md") or "://" in target:
            return m.group(0)
        resolved = posixpath.normpath(posixpath.join("docs", here, target))
        if resolved != "README.md":
            return m.group(0)
        return m.group(1) + posixpath.relpath("index.md", here or ".") + (m.group(3) or "")

    return LINK.sub(fix, markdown)


def _title(path: Path) -> tuple:
    """A page's first heading, its numbers compared as numbers ("2. x" before "10. y")."""
    first = next((line for line in path.read_text().splitlines() if line.startswith("# ")), path.name)
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", first))


def _explicit(nav) -> set[str]:
    """The pages the nav names one by one."""
    if isinstance(nav, list):
        return set().union(*(_explicit(item) for item in nav)) if nav else set()
    if isinstance(nav, dict):
        return _explicit(list(nav.values()))
    return {nav} if isinstance(nav, str) and "*" not in nav and not nav.endswith("/") else set()


def _expand(nav, docs_dir: Path, explicit: set[str]):
    """``nav`` with its folder and pattern entries replaced by their pages; empty sections dropped."""
    if isinstance(nav, list):
        items = [_expand(item, docs_dir, explicit) for item in nav]
        out = []
        for item in items:
            if isinstance(item, list):  # a bare pattern or folder: its pages in its place
                out += item
            elif not (isinstance(item, dict) and all(v == [] for v in item.values())):
                out.append(item)
        return out
    if isinstance(nav, dict):
        return {key: _expand(value, docs_dir, explicit) for key, value in nav.items()}
    if isinstance(nav, str) and nav.endswith("/"):
        found = sorted((docs_dir / nav).glob("*.md"), key=lambda p: (p.name != "README.md", _title(p)))
        return [p.relative_to(docs_dir).as_posix() for p in found]
    if isinstance(nav, str) and "*" in nav:
        found = sorted(p.relative_to(docs_dir).as_posix() for p in docs_dir.glob(nav))
        found = [p for p in found if p not in explicit and p not in ("index.md", "README.md")]
        explicit.update(found)  # a later pattern does not list them again
        if found and nav == "*.md":
            log.info("pages not placed in the nav yet (listed under the catch-all): %s", ", ".join(found))
        return found
    return nav


def on_config(config, **kwargs):
    """Expand the folder (``"name/"``) and pattern (``"name*.md"``) entries of the nav."""
    nav = config["nav"]
    config["nav"] = _expand(nav, Path(config["docs_dir"]), _explicit(nav))
    return config
