"""The README and the docs pages stay short, true and linked (the site itself: ``make docs``).

* The README is at most ``README_MAX_LINES`` lines; its oracle example is at most 20 lines of code
  (blank lines not counted) and runs, its testing example at most 10.
* Every generated table shows what its JSON holds: the ``bench:`` blocks (rendered by
  ``scripts/update_readme.py`` from ``benchmarks/results``) and docs/conformance.md (rendered by
  ``scripts/make_conformance.py`` from docs/conformance.json).
* The README's one-minute example is ``make demo``'s output: the demo is run and compared.
* Every relative link of the README and the pages names a file, and every anchor a heading
  (``scripts/check_docs_links.py --sources-only``; the built site is checked by ``make docs``).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_lines(code: str) -> int:
    return sum(1 for line in code.splitlines() if line.strip())


def _code_block(text: str, heading: str) -> str:
    """The first fenced code block after ``heading``."""
    section = text.split(heading, 1)[1]
    return re.search(r"```\w*\n(.*?)```", section, re.S).group(1)


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move a section to docs/"


def test_readme_oracle_example_runs_and_is_true():
    code = _code_block(README.read_text(), "## The oracle in 20 lines")
    assert _code_lines(code) <= 20
    ns: dict = {}
    exec(compile(code, "README.md (the oracle in 20 lines)", "exec"), ns)  # noqa: S102
    x = ns["x"].astype(np.float64)
    np.testing.assert_allclose(ns["population_mean"], x.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ns["population_var"], x.var(axis=(0, 2, 3)), rtol=1e-12)
    n = x.size // 8
    unbiased = x.var(axis=(0, 2, 3)) * n / (n - 1)
    np.testing.assert_allclose(ns["rv"], 0.9 * 1.0 + 0.1 * unbiased, rtol=1e-12)


def test_readme_testing_example_is_ten_lines():
    code = _code_block(README.read_text(), "## Testing your BN in 10 lines")
    assert _code_lines(code) <= 10


def _bench_blocks():
    update = _script("update_readme")
    return [pytest.param(page, name, body, id=f"{page.name}:{name}") for page in update.pages()
            for kind, name, body in update.blocks(page.read_text()) if kind == "bench"]


def test_there_are_bench_blocks():
    names = {param.values[1] for param in _bench_blocks()}
    assert {"kernels", "process", "images", "recalibrate", "graph"} <= names


@pytest.mark.parametrize("page,name,body", _bench_blocks())
def test_bench_block_is_what_its_json_renders(page, name, body):
    pytest.importorskip("onnx")
    rendered = _script("update_readme").render_bench(name)
    assert body.strip() == rendered, (
        f"{page.relative_to(ROOT)}: the bench:{name} table is not what benchmarks/results renders; "
        "run `python scripts/update_readme.py`"
    )


def test_conformance_page_is_what_its_json_renders():
    make = _script("make_conformance")
    data = json.loads((ROOT / "docs" / "conformance.json").read_text())
    assert (ROOT / "docs" / "conformance.md").read_text() == make.render(data), (
        "docs/conformance.md differs from docs/conformance.json: run `python scripts/make_conformance.py --render`"
    )


NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?(e[+-]?\d+)?(%|pp)?$")


def _same_up_to_noise(shown: str, fresh: str) -> list[str]:
    """Tokens that differ: words exactly, numbers beyond 2% (relative) or 0.5 (absolute)."""
    a, b = shown.split(), fresh.split()
    if len(a) != len(b):
        return [f"{len(a)} tokens shown, {len(b)} printed"]
    bad = []
    for s, f in zip(a, b, strict=True):
        if s == f:
            continue
        if NUMBER.match(s) and NUMBER.match(f):
            x, y = (float(t.rstrip("%p")) for t in (s, f))
            if abs(x - y) <= max(0.5, 0.02 * abs(y)):
                continue  # another CPU's BLAS may train a slightly different network
        bad.append(f"{s!r} shown, {f!r} printed")
    return bad


def test_readme_demo_block_is_what_make_demo_prints():
    """Runs the demo (~10 s): the README's numbers must be the ones it prints now."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("mlxtend")
    update = _script("update_readme")
    shown = {name: body for kind, name, body in update.blocks(README.read_text()) if kind == "demo"}
    assert set(shown) == {"recalibrate"}
    fresh = update.render_demo(update.run_demo())
    bad = _same_up_to_noise(shown["recalibrate"], fresh)
    assert not bad, "README's demo block is not what `make demo` prints (`python scripts/update_readme.py --demo`): " + "; ".join(bad[:5])


def test_noise_tolerance_of_the_demo_comparison_still_sees_changes():
    assert _same_up_to_noise("acc 95.07% +37.47pp", "acc 95.20% +37.40pp") == []
    assert _same_up_to_noise("acc 95.07%", "acc 57.60%")
    assert _same_up_to_noise("var ratio 0.246", "var ratio 0.9")
    assert _same_up_to_noise("geomean 0.246", "mean 0.246")


def test_every_relative_link_and_anchor_resolves():
    errors = _script("check_docs_links").check_sources()
    assert not errors, "\n".join(errors)


def test_link_checker_sees_a_broken_anchor_and_file(tmp_path):
    check = _script("check_docs_links")
    (tmp_path / "docs").mkdir()
    (tmp_path / "mkdocs.yml").write_text("extra:\n  pending:\n    later.md: {from: x}\nnav: []\n")
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Second `part`\n\n[up](../README.md#the-top)\n")
    (tmp_path / "README.md").write_text(
        "# The top\n\n[ok](docs/a.md#second-part) [later](docs/later.md) [bad](docs/a.md#nope) [gone](docs/b.md)\n"
        "`[code](docs/c.md)`\n[x][bnref.Moments] [y][def]\n\n[def]: docs/a.md\n"
    )
    errors = check.check_sources(tmp_path)
    assert errors == [
        "README.md: [x][bnref.Moments] (no [label]: line; GitHub shows it raw)",
        "README.md: docs/a.md#nope (no heading with that anchor)",
        "README.md: docs/b.md (no such file)",
    ]


def test_link_checker_checks_ids_in_the_built_site(tmp_path):
    check = _script("check_docs_links")
    (tmp_path / "index.html").write_text('<h2 id="x">X</h2><a href="p.html#y">p</a><a href="#x">x</a>'
                                         '<a href="https://example.org/">e</a><a href="q.html">q</a>')
    (tmp_path / "p.html").write_text('<h2 id="z">Z</h2>')
    assert check.check_site(tmp_path) == ["index.html: p.html#y (no such id)", "index.html: q.html (no such file)"]


def _griffe_sphinx():
    griffe = pytest.importorskip("griffe")  # the docs extra (make docs installs it before the tests)
    module = _script("griffe_sphinx")
    loader = griffe.GriffeLoader(extensions=griffe.load_extensions(module.SphinxToMarkdown))
    loader.load("bnref", try_relative_path=True)
    return module, loader


def test_roles_become_cross_references_resolved_in_scope():
    module, loader = _griffe_sphinx()
    forward = loader.modules_collection["bnref.precise"]
    text = module.convert(forward, "See :class:`PreciseBN`, :func:`~bnref.moments.Moments.merge` and :mod:`ast`.")
    assert '<autoref identifier="bnref.precise.PreciseBN" optional><code>PreciseBN</code></autoref>' in text
    assert '<autoref identifier="bnref.moments.Moments.merge" optional><code>merge()</code></autoref>' in text
    assert "<code>ast</code>" in text and "autoref identifier=\"ast\"" not in text  # another library: code only
    assert ":class:" not in text and ":func:" not in text and ":mod:" not in text


def test_literal_blocks_become_fenced_code():
    module, loader = _griffe_sphinx()
    obj = loader.modules_collection["bnref"]
    text = module.convert(obj, "Use it like this::\n\n    import bnref\n    bnref.Moments\n\nThe formula ::\n\n    y = a * b\n\nEnd.")
    assert text.startswith("Use it like this:\n\n```python\nimport bnref\nbnref.Moments\n```\n")
    assert "The formula\n\n```python\ny = a * b\n```\n" in text and text.rstrip().endswith("End.")
    assert module.convert(obj, "A line ending in::\nno indented block") == "A line ending in::\nno indented block"


def test_readme_testing_example_passes_a_correct_bn_and_fails_a_wrong_one():
    """The 10 lines, with ``...`` filled by a NumPy BN (float64 inside), correct and then wrong."""
    pytest.importorskip("hypothesis")
    code = _code_block(README.read_text(), "## Testing your BN in 10 lines")
    body = (
        "    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)\n"
        "    shape = [1] * x.ndim; shape[axis] = -1\n"
        "    x64 = x.astype(np.float64); m, v = x64.mean(axes), x64.var(axes)\n"
        "    n = x.size // x.shape[axis]\n"
        "    y = ((x64 - m.reshape(shape)) / np.sqrt(v.reshape(shape) + eps) * scale.reshape(shape)"
        " + bias.reshape(shape)).astype(x.dtype)\n"
        "    new_running_mean = (1 - momentum) * running_mean + momentum * m\n"
        "    new_running_var = (1 - momentum) * running_var + momentum * v * n / (n - BESSEL)\n"
    )
    assert "    ...  # your BN in training mode\n" in code
    code = code.replace("    ...  # your BN in training mode\n", body)
    code = code.replace("dtype=np.float32)", "dtype=np.float32, max_examples=25)")
    ns: dict = {"BESSEL": 1}
    exec(compile(code, "README.md (testing your BN)", "exec"), ns)  # noqa: S102
    ns["test_my_bn"]()  # PyTorch stores the unbiased variance: passes
    ns["BESSEL"] = 0  # the biased variance: a classic porting bug
    with pytest.raises(AssertionError, match="running_var"):
        ns["test_my_bn"]()


def test_nav_folders_list_readme_first_then_by_numbered_title_and_patterns_once(tmp_path):
    pytest.importorskip("mkdocs")  # the docs extra
    hooks = _script("mkdocs_hooks")
    (tmp_path / "ex").mkdir()
    for name, title in (("README.md", "Experiments"), ("b.md", "10. Ten"), ("a.md", "2. Two"), ("c.md", "1. One")):
        (tmp_path / "ex" / name).write_text(f"# {title}\n")
    for name in ("conf.md", "conf_x.md", "other.md", "cli.md", "index.md"):
        (tmp_path / name).write_text(f"# {name}\n")
    nav = ["index.md", {"CLI": "cli.md"}, {"Evidence": ["conf*.md", {"Ex": "ex/"}]}, {"Empty": ["none*.md"]},
           {"More": "*.md"}]
    assert hooks._expand(nav, tmp_path, hooks._explicit(nav)) == [
        "index.md", {"CLI": "cli.md"},
        {"Evidence": ["conf.md", "conf_x.md", {"Ex": ["ex/README.md", "ex/c.md", "ex/a.md", "ex/b.md"]}]},
        {"More": ["other.md"]},
    ]


def test_readme_links_into_docs_become_site_links():
    pytest.importorskip("mkdocs")
    hooks = _script("mkdocs_hooks")
    text = '[cli](docs/cli.md#x) [ext](https://a.org/docs/y) <img src="docs/p.png"> [r]: docs/a.md'
    assert hooks.readme_as_index(text) == '[cli](cli.md#x) [ext](https://a.org/docs/y) <img src="p.png"> [r]: a.md'
