"""A griffe extension that turns the docstrings' reStructuredText into the Markdown mkdocstrings renders.

The docstrings of ``bnref`` and ``onnx_tools`` are written for reading in an editor and with
``help()``: Sphinx roles (``:func:`collect```, ``:class:`~onnx_tools.data.DataSource```) and
literal blocks introduced by ``::``. This extension (named in ``mkdocs.yml``) rewrites each
docstring once, when griffe has loaded its package:

* a role whose name resolves to an object of the loaded packages becomes an autorefs
  cross-reference (``<autoref identifier=... optional>``): a link where that object is rendered
  in the reference, plain code where it is not (a private helper, a module not in the
  reference), never a warning;
* a role that does not resolve (a name of another library: ``:mod:`ast```) becomes code and is
  recorded in :data:`UNRESOLVED` (``python scripts/griffe_sphinx.py`` lists them);
* ``~`` shows the last component only, as Sphinx does;
* a paragraph ending in ``::`` followed by an indented block becomes a fenced code block
  (``python`` where the block reads as Python, ``text`` otherwise).

The source files are never changed.
"""

from __future__ import annotations

import html
import re
import sys
import textwrap

import griffe

ROLE = re.compile(r":(?:py:)?(func|mod|class|meth|data|attr|exc|obj):`(~?)([^`<>]+?)`")
PYTHON_HINTS = re.compile(r"^\s*(import |from \S+ import |def |class |@|>>> |\w[\w.]* = |\w+\(.*\)\s*(#.*)?$)", re.M)

#: ``(object path, role text)`` of every role that named nothing griffe could find.
UNRESOLVED: list[tuple[str, str]] = []


def _resolve(obj: griffe.Object, name: str) -> str | None:
    """The full path ``name`` means inside ``obj``'s scope, or None."""
    head, _, rest = name.partition(".")
    scopes = [obj, *_parents(obj)]
    for scope in scopes:
        try:
            path = scope.resolve(head)
        except (griffe.NameResolutionError, AttributeError, KeyError):
            continue
        return f"{path}.{rest}" if rest else path
    try:  # an absolute path of a loaded package
        obj.modules_collection[name]
    except KeyError:
        return None
    return name


def _parents(obj: griffe.Object):
    parent = obj.parent
    while parent is not None:
        yield parent
        parent = parent.parent


def _role(obj: griffe.Object, match: re.Match) -> str:
    _, tilde, name = match.groups()
    name = name.strip().rstrip("()")
    shown = name.rsplit(".", 1)[-1] if tilde else name
    if match.group(1) in ("func", "meth"):
        shown += "()"
    target = _resolve(obj, name)
    code = f"<code>{html.escape(shown)}</code>"
    if target is None:
        UNRESOLVED.append((obj.path, match.group(0)))
        return code
    return f'<autoref identifier="{html.escape(target)}" optional>{code}</autoref>'


def _fence(text: str) -> str:
    """Literal blocks (``::`` then an indented block) -> fenced code blocks."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::") or line.strip().startswith(".."):
            out.append(line)
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        indent = len(line) - len(line.lstrip())
        block_start, k = j, j
        while k < len(lines) and (not lines[k].strip() or len(lines[k]) - len(lines[k].lstrip()) > indent):
            k += 1
        while k > block_start and not lines[k - 1].strip():
            k -= 1
        if k == block_start:  # no indented block follows: leave the line alone
            out.append(line)
            i += 1
            continue
        stripped = line.rstrip()  # RST: "text::" -> "text:", "text ::" -> "text", "::" -> nothing
        head = "" if stripped.strip() == "::" else stripped[:-3] if stripped.endswith(" ::") else stripped[:-1]
        if head.strip():
            out.append(head)
        block = textwrap.dedent("\n".join(lines[block_start:k]))
        lang = "python" if PYTHON_HINTS.search(block) else "text"
        pad = " " * indent
        out += ["", f"{pad}```{lang}", *[pad + b if b else "" for b in block.split("\n")], f"{pad}```", ""]
        i = k
    return "\n".join(out)


def convert(obj: griffe.Object, text: str) -> str:
    """``text`` (a docstring of ``obj``) with its roles and literal blocks in Markdown."""
    text = _fence(text)
    return ROLE.sub(lambda m: _role(obj, m), text)


class SphinxToMarkdown(griffe.Extension):
    """Rewrite every docstring of a package once it is loaded (its imports resolved)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        """Convert the docstrings of ``pkg`` and of everything it defines."""
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = convert(obj, obj.docstring.value)
            stack += [m for m in obj.members.values() if not m.is_alias]


def main() -> int:
    """List the roles of ``bnref`` and ``onnx_tools`` that resolve to nothing."""
    loader = griffe.GriffeLoader(extensions=griffe.load_extensions(SphinxToMarkdown))
    for name in ("bnref", "onnx_tools"):
        loader.load(name, try_relative_path=True)
    loader.resolve_aliases(implicit=True, external=False)
    for path, role in UNRESOLVED:
        print(f"{path}: {role}")
    print(f"{len(UNRESOLVED)} unresolved role(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
