"""Fill README.md's benchmark tables from benchmarks/results/*.json.

Each ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` block is replaced by the table that
``benchmarks/bench_NAME.py``'s ``markdown(data)`` renders from ``benchmarks/results/NAME.json``,
or, where the module has one, its ``readme_markdown(results_dir)`` (kernels: one table per CPU
kind, from every ``benchmarks/results/kernels*.json``). Run after ``make bench``; the numbers in
the README are then exactly those of the JSON files. ``--print``: print the blocks, write nothing.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _render(name: str) -> str:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = ROOT / "benchmarks" / "results"
    if hasattr(module, "readme_markdown"):
        return module.readme_markdown(results).strip()
    data = json.loads((results / f"{name}.json").read_text())
    return module.markdown(data).strip()


def main(argv: list[str] | None = None) -> int:
    """Rewrite every bench block of README.md in place (``--print``: print them instead)."""
    argv = sys.argv[1:] if argv is None else argv
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name in re.findall(r"<!-- bench:(\w+) -->", text):
        block = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
        table = _render(name)
        if "--print" in argv:
            print(f"<!-- bench:{name} -->\n{table}\n<!-- /bench:{name} -->\n")
            continue
        text = block.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), text)
    if "--print" in argv:
        return 0
    readme.write_text(text)
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
