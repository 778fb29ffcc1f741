"""Fill the generated blocks of README.md and the docs pages from the files that hold their numbers.

A block is the text between ``<!-- KIND:NAME -->`` and ``<!-- /KIND:NAME -->`` in README.md or any
page under docs/ (the tables live where a reader looks for them, mostly docs/performance.md):

* ``bench:NAME`` -- the table that ``benchmarks/bench_NAME.py``'s ``markdown(data)`` renders from
  ``benchmarks/results/NAME.json``, or, where the module has one, its
  ``readme_markdown(results_dir)`` (kernels: one table per CPU kind, from every
  ``benchmarks/results/kernels*.json``). Run after ``make bench``.
* ``demo:recalibrate`` -- excerpts of ``make demo``'s own output (the ``bnref-onnx recalibrate``
  transcript and the accuracy table); only with ``--demo``, which runs the demo (~10 s).

``--print``: print the blocks, write nothing. ``--check``: write nothing, exit 1 naming every
bench block that differs from what its JSON renders (tests/test_docs.py does the same).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- (\w+):(\w+) -->\n)(.*?)(<!-- /\2:\3 -->)", re.S)
DEMO_OUT = "out/demo"  # the folder `make demo` writes to, as the README shows it


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(text: str) -> list[tuple[str, str, str]]:
    """``(kind, name, body)`` of each generated block in ``text``."""
    return [(m.group(2), m.group(3), m.group(4)) for m in BLOCK.finditer(text)]


def render_bench(name: str) -> str:
    """The ``bench:NAME`` block's text, from ``benchmarks/results``."""
    path = ROOT / "benchmarks" / f"bench_{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = ROOT / "benchmarks" / "results"
    if hasattr(module, "readme_markdown"):
        return module.readme_markdown(results).strip()
    data = json.loads((results / f"{name}.json").read_text())
    return module.markdown(data).strip()


def run_demo() -> str:
    """``make demo``'s output, stderr included (run in a temporary folder), its paths shown as ``out/demo``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-m", "demo.run_demo", "--out", tmp],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True,
        ).stdout
    return out.replace(tmp, DEMO_OUT)


def render_demo(output: str) -> str:
    """The ``demo:recalibrate`` block: the recalibrate transcript and the accuracy table, verbatim."""
    lines = [line.rstrip() for line in output.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("$ bnref-onnx recalibrate"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("wrote "))
    table = next(i for i, line in enumerate(lines) if line.startswith("Accuracy on "))
    rows = table + 2
    while rows < len(lines) and lines[rows].strip():
        rows += 1
    return "\n".join(
        ["```console", *lines[start : end + 1], "```", "", lines[table], "", "```text",
         *lines[table + 2 : rows], "```"]
    )


def update(text: str, rendered: dict[tuple[str, str], str]) -> str:
    """``text`` with each block named in ``rendered`` replaced by its new body."""

    def fill(m: re.Match) -> str:
        body = rendered.get((m.group(2), m.group(3)))
        return m.group(0) if body is None else m.group(1) + body + "\n" + m.group(5)

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the generated blocks in place (see the module docstring for the options)."""
    argv = sys.argv[1:] if argv is None else argv
    demo = render_demo(run_demo()) if "--demo" in argv else None
    stale = []
    for page in pages():
        text = page.read_text()
        rendered = {}
        for kind, name, body in blocks(text):
            if kind == "bench":
                rendered[kind, name] = render_bench(name)
            elif kind == "demo" and demo is not None:
                rendered[kind, name] = demo
            else:
                continue
            if rendered[kind, name].strip() != body.strip():
                stale.append(f"{page.relative_to(ROOT)}: {kind}:{name}")
            if "--print" in argv:
                print(f"<!-- {kind}:{name} -->\n{rendered[kind, name]}\n<!-- /{kind}:{name} -->\n")
        if "--print" not in argv and "--check" not in argv and rendered:
            page.write_text(update(text, rendered))
    if "--check" in argv:
        for line in stale:
            print(f"out of date: {line}", file=sys.stderr)
        return 1 if stale else 0
    if "--print" not in argv:
        print("updated: " + (", ".join(stale) or "nothing changed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
