"""Tests of the data pipeline that keeps the runtime busy (issue 14).

Decoding on a pool of threads and preparing batches ahead (``batches(plan, ahead=k)``, which
``collect`` uses) must not change which samples land in which batch, nor a byte of them: every
batch is compared with a sequential reference built here from the public per-image functions
(``load_image`` + the batch-wide ``normalize``) in the order the batching rules give, with
decoding slowed at random so the threads finish out of order. Early stops (a closed
generator, an error, Ctrl-C) must leave no thread running, errors must keep their messages,
and ``jpeg_draft`` must stay within its stated bound.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import onnx_tools as ot
import onnx_tools.collection as collection_mod
from onnx_tools.data import BatchPlan, ImageOptions, open_data
from onnx_tools.data import images as images_mod
from onnx_tools.data.pixels import DRAFT_MARGIN, PixelTable, load_image, normalize, resized_size
from onnx_tools.data.prefetch import DecodePool, ahead
from onnx_tools.errors import DataError, Interrupted
from tests.onnx_tools.data_helpers import ids, one_input, rows
from tests.onnx_tools.helpers import cnn_data, cnn_model

Image = pytest.importorskip("PIL.Image")
JpegImagePlugin = pytest.importorskip("PIL.JpegImagePlugin")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
GRAY = ((0.449,), (0.226,))


def bnref_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("bnref-")]


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    assert bnref_threads() == []
    yield
    assert bnref_threads() == []  # every test ends with every pipeline thread gone


@pytest.fixture
def mixed_folder(tmp_path):
    """29 images of every kind the loader takes, in nested folders, sizes 18..60 px."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    for k in range(29):
        w, h = (int(v) for v in rng.integers(18, 61, 2))
        path = folder / f"d{k % 3}" / f"{k:02d}.{'jpg' if k % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if k == 7:
            Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(
                path.with_suffix(".png"))  # 16-bit gray: float pixels in its batch
            continue
        image = Image.fromarray(pixels)
        if k % 5 == 0:
            image = image.convert("L")
        elif k % 7 == 3 and path.suffix == ".png":
            image = image.convert("RGBA")
        image.save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
    return folder


@pytest.fixture
def jittered(monkeypatch):
    """Decoding takes 0-3 ms at random, so the pool's threads finish out of order."""
    real, rng, lock = images_mod.load_image, np.random.default_rng(1), threading.Lock()

    def slow(*args, **kwargs):
        with lock:
            delay = float(rng.uniform(0, 0.003))
        time.sleep(delay)
        return real(*args, **kwargs)

    monkeypatch.setattr(images_mod, "load_image", slow)


def reference(folder: Path, plan: BatchPlan, size, mode, layout, dtype, mean_std):
    """Batches in the order of onnx_tools.data.plan, decoded one after the other."""
    files = sorted(folder.rglob("*.*"), key=lambda p: p.relative_to(folder).as_posix())
    total = len(files)
    n = total if plan.num_samples is None else min(plan.num_samples, total)
    order = (np.random.default_rng(plan.seed).permutation(total)[:n] if plan.shuffle
             else np.arange(n))
    count = n // plan.batch_size + (1 if n % plan.batch_size and plan.keep_partial else 0)
    first, step = plan.shard or (0, 1)
    resize = int(round(max(size) / 0.875))
    out = []
    for index in range(first, count, step):
        chosen = order[index * plan.batch_size:(index + 1) * plan.batch_size]
        pixels = np.stack([load_image(files[i], size, resize, mode, False, True) for i in chosen])
        out.append((index, normalize(pixels, 1 / 255, *mean_std, layout, np.dtype(dtype))))
    return out


PLANS = [
    BatchPlan(batch_size=4),
    BatchPlan(batch_size=4, shuffle=True, seed=3),
    BatchPlan(batch_size=3, shuffle=True, seed=5, shard=(1, 3)),
    BatchPlan(batch_size=5, shard=(0, 2), keep_partial=True),
    BatchPlan(batch_size=6, num_samples=23, shuffle=True, keep_partial=True),
]
INPUTS = [  # dims, ONNX dtype, crop, mode, layout, NumPy dtype, normalization
    ("N, 3, 16, 16", "float", (16, 16), "RGB", "NCHW", np.float32, IMAGENET),
    ("N, 12, 10, 3", "float16", (12, 10), "RGB", "NHWC", np.float16, IMAGENET),
    ("N, 1, 9, 9", "double", (9, 9), "L", "NCHW", np.float64, GRAY),
    ("N, 3, 8, 8", "uint8", (8, 8), "RGB", "NCHW", np.uint8, IMAGENET),
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"B{p.batch_size}-{p.shuffle}-{p.shard}")
@pytest.mark.parametrize("model_input", INPUTS, ids=lambda i: f"{i[4]}-{i[1]}")
def test_threads_and_prefetch_give_the_sequential_batches_byte_for_byte(
        mixed_folder, jittered, plan, model_input):
    dims, onnx_dtype, size, mode, layout, dtype, mean_std = model_input
    specs = one_input(dims, onnx_dtype)
    expected = reference(mixed_folder, plan, size, mode, layout, dtype, mean_std)
    runs = {}
    for threads, depth in ((1, 0), (4, 1), (3, 2)):
        source = open_data(mixed_folder, specs, ImageOptions(threads=threads))
        got = [(i, f["x"]) for i, f in source.batches(plan, ahead=depth)]
        assert [i for i, _ in got] == [i for i, _ in expected]
        for (_, a), (_, b) in zip(got, expected, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        runs[threads] = source.summary
    assert len({(s.fingerprint, s.num_batches, s.num_samples, s.dropped) for s in runs.values()}) == 1


def test_arrays_and_readers_prepared_ahead_are_the_same_batches(tmp_path):
    x = rows(50)
    np.save(tmp_path / "x.npy", x)
    for plan in (BatchPlan(batch_size=8, shuffle=True, seed=2), BatchPlan(batch_size=7, shard=(2, 3))):
        source = open_data(tmp_path / "x.npy", one_input())
        plain = [(i, ids(f["x"])) for i, f in source.batches(plan)]
        first = source.summary.fingerprint
        assert [(i, ids(f["x"])) for i, f in source.batches(plan, ahead=2)] == plain
        assert source.summary.fingerprint == first
    feeds = [{"x": x[k:k + 3]} for k in range(0, 50, 3)]
    source = open_data(feeds, one_input())
    plain = [(i, f["x"].tobytes()) for i, f in source.batches(BatchPlan(batch_size=4))]
    assert [(i, f["x"].tobytes()) for i, f in
            source.batches(BatchPlan(batch_size=4), ahead=1)] == plain


def test_a_reader_refilling_one_buffer_is_copied_before_it_is_asked_again():
    buffer = np.zeros((4, 2), np.float32)

    def gen():
        for i in range(6):
            buffer[:] = i  # a feed of the batch size: passed through, then refilled
            yield {"x": buffer}

    source = open_data(gen(), one_input("N, 2"))
    seen = []
    for _, feed in source.batches(BatchPlan(batch_size=4), ahead=2):
        time.sleep(0.01)  # the thread working ahead has refilled the buffer by now
        seen.append(feed["x"][:, 0].tolist())
    assert seen == [[float(i)] * 4 for i in range(6)]


# ------------------------------------------------------------------- stopping and errors


def test_a_consumer_that_stops_after_one_batch_leaves_no_thread(mixed_folder):
    source = open_data(mixed_folder, one_input("N, 3, 8, 8"), ImageOptions(threads=3))
    batches = source.batches(BatchPlan(batch_size=4), ahead=2)
    next(batches)
    assert bnref_threads()  # the batches after the first are being made
    batches.close()
    assert bnref_threads() == []
    assert source.summary.num_batches == 1  # what was handed out, not what was made ahead


def test_a_loop_left_with_break_stops_its_threads(mixed_folder):
    def first_two():
        source = open_data(mixed_folder, one_input("N, 3, 8, 8"), ImageOptions(threads=2))
        out = []
        for index, _ in source.batches(BatchPlan(batch_size=2), ahead=1):
            out.append(index)
            if len(out) == 2:
                break
        return out

    assert first_two() == [0, 1]  # the generator is dropped, and closed, on return


def test_ahead_stays_bounded_and_hands_over_the_error_object():
    made = []

    def items():
        for k in range(100):
            made.append(k)
            yield k

    stream = ahead(items(), depth=2)
    assert next(stream) == 0
    time.sleep(0.05)
    assert len(made) <= 1 + 2 + 1  # the one handed out, the queue, the one being put
    stream.close()
    error = RuntimeError("boom")

    def failing():
        yield 1
        raise error

    stream = ahead(failing())
    assert next(stream) == 1
    with pytest.raises(RuntimeError) as caught:
        next(stream)
    assert caught.value is error
    with pytest.raises(ValueError, match="depth"):
        next(ahead([], depth=0))


def test_keyboard_interrupt_from_a_reader_propagates_as_itself():
    def gen():
        for i in range(10):
            if i == 3:
                raise KeyboardInterrupt
            yield {"x": np.full((2, 2), i, np.float32)}

    source = open_data(gen(), one_input("N, 2"))
    got = []
    with pytest.raises(KeyboardInterrupt) as caught:
        for index, _ in source.batches(BatchPlan(batch_size=2), ahead=1):
            got.append(index)
    assert type(caught.value) is KeyboardInterrupt and got == [0, 1, 2]


def test_a_bad_image_surfaces_at_its_batch_with_its_message(mixed_folder, monkeypatch):
    real = images_mod.load_image
    files = sorted(mixed_folder.rglob("*.*"), key=lambda p: p.relative_to(mixed_folder).as_posix())
    slow_bad, fast_bad = files[9], files[10]  # batch 2 of 4, in this order

    def load(path, *args, **kwargs):
        if path == slow_bad:
            time.sleep(0.05)  # fails last in time, first in batch order
            raise DataError(f"cannot read image {path}: slow")
        if path == fast_bad:
            raise DataError(f"cannot read image {path}: fast")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(images_mod, "load_image", load)
    source = open_data(mixed_folder, one_input("N, 3, 8, 8"), ImageOptions(threads=4))
    got = []
    with pytest.raises(DataError) as caught:
        for index, _ in source.batches(BatchPlan(batch_size=4), ahead=1):
            got.append(index)
    assert got == [0, 1]
    assert str(caught.value) == f"cannot read image {slow_bad}: slow"


def test_nan_in_a_batch_prepared_ahead_names_that_batch():
    x = rows(12)
    x[9, 0, 0, 0] = np.nan  # batch 2 of 4, sample 1
    source = open_data(x, one_input())
    got = []
    with pytest.raises(DataError, match=r"^batch 2: input 'x' contains 1 NaN/Inf value\(s\) "
                                        r"\(first in sample 1 of the batch\)$"):
        for index, _ in source.batches(BatchPlan(batch_size=4), ahead=1):
            got.append(index)
    assert got == [0, 1]


@pytest.fixture
def cnn_folder(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "cnn_imgs"
    folder.mkdir()
    for k in range(20):
        Image.fromarray(rng.integers(0, 256, (9, 11, 3), np.uint8)).save(folder / f"{k:02d}.png")
    return folder


def test_collect_prepared_ahead_equals_collect_one_batch_at_a_time(cnn_folder, monkeypatch):
    model = cnn_model()
    kwargs = dict(batch_size=4, shuffle=True, seed=1, image_options=ImageOptions(threads=3))
    ahead_stats = ot.collect(model, cnn_folder, **kwargs)
    monkeypatch.setattr(collection_mod, "PREFETCH", 0)
    plain = ot.collect(model, cnn_folder, **{**kwargs, "image_options": ImageOptions(threads=1)})
    assert ahead_stats.data_fingerprint == plain.data_fingerprint
    assert ahead_stats.num_batches == plain.num_batches == 5
    for key, bn in plain.bns.items():
        other = ahead_stats.bns[key].precise
        assert np.array_equal(bn.precise.mean, other.mean)
        assert np.array_equal(bn.precise.var, other.var)


def test_interrupt_between_batches_stops_the_threads_working_ahead(cnn_folder, monkeypatch):
    calls = []

    def hook(index):
        calls.append(index)
        if index == 1:
            raise Interrupted(2)

    monkeypatch.setattr(collection_mod, "between_batches", hook)
    with pytest.raises(Interrupted) as caught:
        ot.collect(cnn_model(), cnn_folder, batch_size=4)
    # the traceback still holds the frames that held the batches: stopped all the same
    assert caught.value.signum == 2 and calls == [0, 1] and bnref_threads() == []


def test_a_session_error_is_not_hidden_by_the_bad_batch_made_ahead(monkeypatch):
    data = cnn_data(16)
    data[9, 0, 0, 0] = np.inf  # batch 2: made, and failing, while batch 1 runs
    real = collection_mod.run_batch

    def run(session, names, feed, index):
        if index == 1:
            raise DataError("batch 1: onnxruntime could not run the model on it: test")
        return real(session, names, feed, index)

    monkeypatch.setattr(collection_mod, "run_batch", run)
    messages = {}
    for prefetch in (1, 0):
        monkeypatch.setattr(collection_mod, "PREFETCH", prefetch)
        with pytest.raises(DataError) as caught:
            ot.collect(cnn_model(), data, batch_size=4)
        messages[prefetch] = str(caught.value)
    assert messages[1] == messages[0] == "batch 1: onnxruntime could not run the model on it: test"
    monkeypatch.setattr(collection_mod, "run_batch", real)
    for prefetch in (1, 0):
        monkeypatch.setattr(collection_mod, "PREFETCH", prefetch)
        with pytest.raises(DataError, match=r"^batch 2: input 'x' contains 1 NaN/Inf"):
            ot.collect(cnn_model(), data, batch_size=4)


def test_image_threads_must_be_a_positive_integer(mixed_folder):
    # Checked when the options are made (issue 19): a value out of range is an OptionError,
    # a value of another type (1.5, True) an OptionTypeError, never coerced.
    for bad in (0, -1):
        with pytest.raises(ot.OptionError, match="threads must be a positive integer"):
            open_data(mixed_folder, one_input("N, 3, 8, 8"), ImageOptions(threads=bad))
    for bad in (1.5, True):
        with pytest.raises(ot.OptionTypeError, match="threads must be an integer"):
            ImageOptions(threads=bad)


def test_decode_pool_raises_the_first_error_in_item_order():
    def work(k, delay):
        time.sleep(delay)
        if k in (1, 2):
            raise ValueError(f"item {k}")

    with DecodePool(3) as pool, pytest.raises(ValueError, match="item 1"):
        pool.run(work, [0.0, 0.03, 0.0, 0.0])


# ------------------------------------------------------------------- per-image normalization


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.uint8])
@pytest.mark.parametrize("channels", [1, 3])
def test_pixel_table_is_normalize_bit_for_bit(layout, dtype, channels):
    rng = np.random.default_rng(2)
    mean, std = (IMAGENET if channels == 3 else GRAY)
    table = PixelTable(1 / 255, mean, std, layout, np.dtype(dtype), channels)
    pixels = rng.integers(0, 256, (3, 5, 7, channels), dtype=np.uint8)
    wide = np.concatenate([pixels, np.full((1, 5, 7, channels), 255, np.uint8)])
    floats = rng.uniform(0, 255, (5, 7, channels)).astype(np.float32)  # a 16-bit image
    batch = np.concatenate([wide.astype(np.float32), floats[np.newaxis]])
    expected = normalize(batch, 1 / 255, mean, std, layout, np.dtype(dtype))  # a mixed batch
    got = np.empty_like(expected)
    for k, image in enumerate([*wide, floats]):
        table.write(got[k], image)
    assert got.tobytes() == expected.tobytes()


# ------------------------------------------------------------------- JPEG draft


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Photo-like: a smooth colour field, edges, noise."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    pixels = np.asarray(field.resize((w, h), Image.Resampling.BICUBIC)).astype(np.float32)
    pixels[h // 3: h // 2, w // 4: w // 2] *= 0.4  # a dark rectangle: sharp edges
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture
def drafts(monkeypatch):
    """Every reduced JPEG decode: (stored size, reduced size)."""
    seen = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        stored = self.size
        result = real(self, mode, size)
        seen.append((stored, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return seen


@pytest.mark.parametrize(("crop", "scale"), [(224, 2), (96, 4), (40, 8)])
def test_jpeg_draft_stays_within_its_bound(tmp_path, drafts, crop, scale):
    path = tmp_path / "big.jpg"
    photo(2000, 1500).save(path, quality=90)
    resize = int(round(crop / 0.875))
    full = load_image(path, (crop, crop), resize, "RGB", draft=False)
    assert drafts == []
    reduced = load_image(path, (crop, crop), resize, "RGB", draft=True)
    ((stored, got),) = drafts
    target = resized_size(*stored, resize)
    assert stored[0] // got[0] == scale  # the reduction the rule allows, and no more
    assert all(g >= DRAFT_MARGIN * t for g, t in zip(got, target, strict=True))
    diff = np.abs(full.astype(np.int16) - reduced.astype(np.int16))
    assert reduced.shape == full.shape == (crop, crop, 3)
    assert diff.mean() <= 1.0 and diff.max() <= 16  # the bound stated in pixels.py


def test_draft_leaves_other_files_and_small_jpegs_untouched(tmp_path, drafts):
    big = photo(2000, 1500)
    big.save(tmp_path / "big.png")
    big.resize((500, 375)).save(tmp_path / "small.jpg", quality=90)
    oriented = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    big.save(oriented, quality=90, exif=exif)
    for path, turn in ((tmp_path / "big.png", False), (tmp_path / "small.jpg", False),
                       (oriented, True)):
        on = load_image(path, (224, 224), 256, "RGB", turn, draft=True)
        off = load_image(path, (224, 224), 256, "RGB", turn, draft=False)
        assert on.tobytes() == off.tobytes()
    assert drafts == []  # never asked: not a JPEG, too small, or turned by EXIF


def test_jpeg_draft_is_an_image_option(tmp_path, drafts):
    folder = tmp_path / "big"
    folder.mkdir()
    photo(1400, 1400).save(folder / "a.jpg", quality=90)
    specs = one_input("N, 3, 64, 64")
    off = open_data(folder, specs, ImageOptions(jpeg_draft=False))
    x_off = next(off.batches(BatchPlan(batch_size=1)))[1]["x"]
    assert drafts == []
    on = open_data(folder, specs)  # the default
    x_on = next(on.batches(BatchPlan(batch_size=1)))[1]["x"]
    assert len(drafts) == 1 and drafts[0][1] == (350, 350)  # 1/4: 350 >= 2.5 x 73
    assert np.abs(x_on - x_off).mean() * 0.226 * 255 <= 1.0  # in 8-bit levels


SQLITE_READER = '''
import sqlite3
import numpy as np

def make():
    """Feeds from an in-memory sqlite3 database: its objects refuse any thread but their own."""
    x = np.load(__file__.replace("sqlite_reader.py", "calib.npy"))
    db = sqlite3.connect(":memory:")
    db.execute("create table batches (i integer, data blob)")
    db.executemany("insert into batches values (?, ?)",
                   [(i, x[i:i + 4].tobytes()) for i in range(0, len(x), 4)])
    for (blob,) in db.execute("select data from batches order by i"):
        yield {"x": np.frombuffer(blob, np.float32).reshape(-1, *x.shape[1:])}
'''


def test_a_reader_tied_to_its_thread_fails_clearly_and_runs_with_no_prefetch(tmp_path):
    """A sqlite3 cursor cannot move to the thread working ahead: one line naming the way out."""
    from tests.onnx_tools.helpers import run_cli, stored_stats, write_cnn_files

    model, data = write_cnn_files(tmp_path)
    (tmp_path / "sqlite_reader.py").write_text(SQLITE_READER)
    reader = f"{tmp_path / 'sqlite_reader.py'}:make"
    out = tmp_path / "out.onnx"
    code, _, err = run_cli("recalibrate", model, "--data", reader, "-o", out, "--batch-size", "8")
    assert code == 1 and not out.exists()
    errors = [line for line in err.splitlines() if line.startswith("bnref-onnx: error")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "ProgrammingError" in errors[0] and "--no-prefetch" in errors[0]
    code, _, err = run_cli("recalibrate", model, "--data", reader, "-o", out, "--batch-size", "8",
                           "--no-prefetch")
    assert code == 0, err
    code, _, err = run_cli("recalibrate", model, "--data", data, "-o", tmp_path / "ref.onnx",
                           "--batch-size", "8")
    assert code == 0, err
    feed = {"x": cnn_data()[:2]}
    got, want = stored_stats(out, feed), stored_stats(tmp_path / "ref.onnx", feed)
    for key in want:  # the same batches: the same statistics, bit for bit
        for a, b in zip(got[key], want[key], strict=True):
            np.testing.assert_array_equal(a, b)
