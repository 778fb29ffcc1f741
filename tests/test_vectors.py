"""``python -m bnref.vectors``: the files pass an independent reader, which a planted bug fails.

The reader (``tests/vectors_reader/reader.py``) is plain NumPy and never imports bnref: it
reads only the files. The default set here is small (PyTorch and Keras conventions, float32
and bfloat16: both momentum meanings, Bessel or not, both channel axes, a 16-bit dtype);
``-m slow`` runs every convention and dtype.
"""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import bnref.vectors as bv
from bnref.vectors import store
from tests.vectors_reader import reader as R

READER_DIR = Path(R.__file__).resolve().parent
SMALL = ["--convention", "pytorch", "--convention", "keras", "--dtype", "float32", "--dtype", "bfloat16"]


ROOT = Path(__file__).resolve().parent.parent


def cli(*args, check=True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "bnref.vectors", *args], capture_output=True,
                          text=True, check=check, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors") / "small"
    cli(*SMALL, "-o", str(out))
    return out


def test_reader_passes_the_vectors(small):
    cases, checked, failures = R.check_directory(small)
    assert failures == []
    manifest = json.loads((small / "manifest.json").read_text())
    assert cases == len(manifest["cases"]) == 2 * 2 * 9 + 2 * 2  # 16-bit: two range cases more
    assert checked == sum(len(c["expected"]) for c in manifest["cases"]) > 300


def test_reader_never_imports_bnref(small):
    allowed = {"__future__", "hashlib", "io", "json", "sys", "pathlib", "numpy"}
    for path in READER_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert {n.split(".")[0] for n in names} <= allowed, f"{path.name}:{node.lineno} imports {names}"
    # ... and it runs where bnref cannot be imported at all
    block = ("import sys, runpy\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] == 'bnref': raise ImportError('bnref is blocked')\n"
             "sys.meta_path.insert(0, Block())\n"
             f"sys.argv = ['reader', {str(small)!r}]\n"
             f"runpy.run_path({str(READER_DIR / 'reader.py')!r}, run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=small)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 outside tolerance" in done.stdout


ORIGINAL = {n: getattr(R, n) for n in ("running_update", "batch_weight", "precise", "backward", "moments")}


def _eps_outside_sqrt(r, mean, var, eps, scale, bias):
    return (r - mean) / (np.sqrt(var) + eps) * scale + bias


def _no_bessel(om, ov, mean, var, n, conv, momentum):
    return ORIGINAL["running_update"](om, ov, mean, var, n, dict(conv, unbiased_running_var=False), momentum)


def _dx_without_projection(r, dy, mean, var, eps, scale):
    inv = 1.0 / np.sqrt(var + eps)
    dbias, dscale = dy.sum(axis=0), (dy * (r - mean) * inv).sum(axis=0)
    return scale * inv * (dy - dbias / r.shape[0]), dscale, dbias


def _dscale_without_inv_std(r, dy, mean, var, eps, scale):
    dx, _, dbias = ORIGINAL["backward"](r, dy, mean, var, eps, scale)
    return dx, (dy * (r - mean)).sum(axis=0), dbias


def _dbias_averaged(r, dy, mean, var, eps, scale):
    dx, dscale, dbias = ORIGINAL["backward"](r, dy, mean, var, eps, scale)
    return dx, dscale, dbias / r.shape[0]


def _dscale_keepdims(r, dy, mean, var, eps, scale):
    """Right values, shape (1, C): only a shape check sees it (a broadcast would pass)."""
    dx, dscale, dbias = ORIGINAL["backward"](r, dy, mean, var, eps, scale)
    return dx, dscale[None, :], dbias


def _precise_mean_of_first_batch(batches):
    out = ORIGINAL["precise"](batches)
    out["precise_mean"] = ORIGINAL["moments"](batches[0])[0]
    return out


def _precise_var_without_between_batches(batches):
    out = ORIGINAL["precise"](batches)
    out["precise_var"] = np.mean([ORIGINAL["moments"](b)[1] for b in batches], axis=0)
    return out


def _naive_float32_moments(r):
    r = r.astype(np.float32)
    m = r.mean(axis=0)
    return m.astype(np.float64), ((r * r).mean(axis=0) - m * m).astype(np.float64)


def _bfloat16_as_float16(stored, entry):
    return stored.view(np.float16).astype(np.float64) if entry["dtype"] == "bfloat16" else stored.astype(np.float64)


def _batch_avg_biased(batches):
    out = ORIGINAL["precise"](batches)
    out["precise_var_batch_avg"] = np.mean([b.var(axis=0) for b in batches], axis=0)
    return out


BUGS = {  # reader function -> (planted bug, a quantity that must then fail)
    "eps outside the square root": ("normalize", _eps_outside_sqrt, "y_train"),
    "momentum meaning flipped": ("batch_weight", lambda conv, m: 1.0 - ORIGINAL["batch_weight"](conv, m),
                                 "new_running_mean"),
    "no Bessel correction": ("running_update", _no_bessel, "new_running_var"),
    "dx without the x_hat term": ("backward", _dx_without_projection, "dx"),
    "E[x^2] - E[x]^2 in float32": ("moments", _naive_float32_moments, "y_train"),
    "bfloat16 bits read as float16": ("decode", _bfloat16_as_float16, "y_eval"),
    "mean of biased batch variances": ("precise", _batch_avg_biased, "precise_var_batch_avg"),
    "dscale without 1/sqrt(var + eps)": ("backward", _dscale_without_inv_std, "dscale"),
    "dbias averaged, not summed": ("backward", _dbias_averaged, "dbias"),
    "dscale of shape (1, C)": ("backward", _dscale_keepdims, "dscale"),
    "Precise-BN mean of one batch": ("precise", _precise_mean_of_first_batch, "precise_mean"),
    "Precise-BN variance without the batches' spread": ("precise", _precise_var_without_between_batches,
                                                        "precise_var"),
}
#: Every quantity the vectors define (docs/vectors.md); each case lists it as expected or omitted.
QUANTITIES = {"y_train", "y_eval", "dx", "dscale", "dbias", "new_running_mean", "new_running_var",
              "precise_mean", "precise_var", "precise_var_batch_avg"}


def test_the_planted_bugs_cover_every_quantity():
    assert {quantity for _, _, quantity in BUGS.values()} == QUANTITIES


def test_every_case_lists_every_quantity_once(small):
    """What a case does not expect is omitted with a reason, never silently missing; the
    bound the reader applies is ``k * eps_dtype`` of the case's dtype."""
    m = json.loads((small / "manifest.json").read_text())
    for c in m["cases"]:
        assert set(c["expected"]) | set(c["omitted"]) == QUANTITIES, c["id"]
        assert not set(c["expected"]) & set(c["omitted"]), c["id"]
        assert all(c["omitted"].values()), c["id"]
        for spec in c["expected"].values():
            assert spec["k"] == m["tolerance"]["k"][c["dtype"]]
            assert spec["bound"] == spec["k"] * spec["eps_dtype"]
            dt = ml_dtypes.bfloat16 if c["dtype"] == "bfloat16" else np.dtype(c["dtype"])
            assert spec["eps_dtype"] == float(ml_dtypes.finfo(dt).eps)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("bug", sorted(BUGS))
def test_a_planted_bug_fails(small, monkeypatch, bug):
    name, planted, quantity = BUGS[bug]
    monkeypatch.setattr(R, name, planted)
    _, _, failures = R.check_directory(small)
    assert any(f": {quantity}: " in f for f in failures), failures[:5]


def _working_precision(compute):
    """The reader run the way a real implementation is: float32 arithmetic (float64 for
    float64 cases), every result rounded to the case's dtype."""

    def run(case, a):
        work = np.float64 if case["dtype"] == "float64" else np.float32
        out_dt = ml_dtypes.bfloat16 if case["dtype"] == "bfloat16" else np.dtype(case["dtype"])
        b = {k: (v.astype(work) if k in case["inputs"] else v) for k, v in a.items()}
        with np.errstate(all="ignore"):
            got = compute(case, b)
        return {k: np.asarray(v, work).astype(out_dt).astype(np.float64) for k, v in got.items()}

    return run


def test_tolerances_hold_for_a_working_precision_implementation(small, monkeypatch):
    """Not too tight: float32 two-pass arithmetic, rounded to the dtype, passes every case."""
    monkeypatch.setattr(R, "compute", _working_precision(R.compute))
    assert R.check_directory(small)[2] == []


def test_manifest_and_storage(small):
    m = json.loads((small / "manifest.json").read_text())
    assert (m["format"], m["format_version"]) == ("bnref-vectors", bv.FORMAT_VERSION)
    by_id = {c["id"]: c for c in m["cases"]}
    one = by_id["pytorch-bfloat16-one_value_per_channel"]
    assert one["inputs"]["x"] == {"dtype": "bfloat16", "stored_as": "uint16", "shape": [1, 4],
                                  "decode": "float32 bits = uint32(stored) << 16"}
    assert "unbiased" in one["omitted"]["new_running_var"] and "new_running_var" in by_id[
        "keras-bfloat16-one_value_per_channel"]["expected"]
    with np.load(small / one["file"]) as z:
        x = z["x"].view(ml_dtypes.bfloat16)  # the bits are the bfloat16 values
        assert z["x"].dtype == np.uint16 and z["y_train"].dtype == np.float64
    assert np.isfinite(x.astype(np.float64)).all()
    spec = by_id["keras-float32-large_mean"]["expected"]["y_train"]
    assert spec["bound"] == 64 * float(np.finfo(np.float32).eps)
    for name in ("large_mean", "tiny_variance", "huge_variance", "eps_edge", "range_top", "range_bottom"):
        assert f"keras-bfloat16-{name}" in by_id


def test_generation_is_deterministic_and_per_case():
    files_a, man_a = bv.build(["pytorch"], ["float16"])
    files_b, man_b = bv.build(["keras", "pytorch"], ["float32", "float16"])
    assert files_a == bv.build(["pytorch"], ["float16"])[0]
    assert all(files_b[name] == data for name, data in files_a.items())  # same bytes in a larger set
    assert all(c["sha256"] == store.sha256(files_a[c["file"]]) for c in man_a["cases"])


def test_bad_output_directory_is_refused_and_kept(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    done = cli("--dtype", "float32", "--convention", "onnx", "-o", str(out), check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "not an empty directory" in done.stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    bad = cli("--dtype", "float8", "-o", str(tmp_path / "x"), check=False)
    assert bad.returncode == 2 and "invalid choice: 'float8'" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(self, data):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)  # manifest.json comes last
    with pytest.raises(OSError, match="disk full"):
        bv.generate(tmp_path / "out", ["pytorch"], ["float32"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_every_convention_and_dtype(tmp_path):
    out = tmp_path / "all"
    cli("-o", str(out))
    cases, _, failures = R.check_directory(out)
    assert failures == [] and cases == len(bv.CONVENTIONS) * (4 * 9 + 2 * 2)


def test_reader_refuses_files_that_disagree_with_the_manifest(small, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(small, root)
    m = json.loads((root / "manifest.json").read_text())
    case = m["cases"][0]
    wrong_shape = json.loads(json.dumps(case))
    wrong_shape["inputs"]["x"]["shape"] = [1, *case["inputs"]["x"]["shape"]]
    with pytest.raises(ValueError, match=r"x stored as \w+ \[.*manifest says"):
        R.load_case(root, wrong_shape)
    (root / case["file"]).write_bytes((root / case["file"]).read_bytes() + b"\0")
    with pytest.raises(ValueError, match="sha256 differs from the manifest"):
        R.load_case(root, case)
