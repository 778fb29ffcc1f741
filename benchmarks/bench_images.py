"""``bnref-onnx recalibrate`` over a folder of JPEGs against a plain loop and fvcore.

Run with an interpreter that has torchvision and fvcore next to bnref (the export and route
(c) need them)::

    python benchmarks/bench_images.py [--images 512] [--rounds 3] [--before HEAD_TREE]
    python benchmarks/bench_images.py --markdown      # the README table from the JSON

It generates ``--images`` photo-like JPEGs (500x375: a smooth random colour field plus
noise, quality 90), exports torchvision's ResNet-18 and MobileNetV3-small (random weights,
eval mode, ``dynamo=False``, ``training=TrainingMode.PRESERVE`` so BN is kept, input
``N x 3 x 224 x 224`` with a dynamic batch) and times, as whole processes, interleaved (the
order is reversed every other round; medians of the rounds, ratios within a round):

* (a) ``plain``: pillow decode, resize of the shorter side to 256 (bilinear), centre crop 224,
  scale and ImageNet normalization, one image at a time, then onnxruntime inference of the
  *original* model per batch of 64 (the tool's session options);
* (b) ``recalibrate``: ``bnref-onnx recalibrate MODEL --data FOLDER -o OUT --batch-size 64``
  (``recalibrate_before``: the same with the tree given by ``--before``, e.g. ``git archive
  HEAD`` unpacked, for a before/after comparison in the same rounds);
* (c) ``fvcore``: ``update_bn_stats(model, loader, num_iters=len(loader))`` with a Dataset over
  the same files, ``Resize(256)``, ``CenterCrop(224)``, ``ToTensor``, ``Normalize`` and
  ``DataLoader(batch_size=64, num_workers=2)``.

Every route runs in its own process; *work* is the time after the heavy imports (numpy,
onnxruntime, onnx, pillow, torch) until the job is done, *process* the whole process, *CPU*
its user + system time (DataLoader workers included). Once per
model a probe splits the tool's time into decoding (the image pipeline alone) and
``session.run`` (collection model and original model on the decoded batches), and the peak
anonymous RSS (``RssAnon`` polled every 10 ms, so file pages of mapped libraries and models
are left out) of ``recalibrate`` is measured over ``--images`` and 4x as many images.
Writes ``benchmarks/results/images.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "images.json"
MODELS = ("resnet18", "mobilenet_v3_small")
BATCH = 64

PLAIN = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import onnxruntime as ort
from pathlib import Path
from PIL import Image
t1 = time.perf_counter()
model, folder, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
def load(path):
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        nw, nh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        top, left = int(round((nh - 224) / 2)), int(round((nw - 224) / 2))
        x = np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32)
    x *= np.float32(1 / 255)
    x -= MEAN
    x /= STD
    return x.transpose(2, 0, 1)
options = ort.SessionOptions()
options.log_severity_level = 3
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
files = sorted(folder.rglob("*.jpg"))
decode = run = 0.0
for start in range(0, len(files) // batch * batch, batch):
    a = time.perf_counter()
    x = np.stack([load(p) for p in files[start:start + batch]])
    b = time.perf_counter()
    session.run(None, {name: x})
    decode, run = decode + b - a, run + time.perf_counter() - b
print(json.dumps({"imports": t1 - t0, "work": time.perf_counter() - t1, "decode": decode,
                  "session": run}))
"""

TOOL = """
import json, sys, time
t0 = time.perf_counter()
import numpy, onnx, onnxruntime, PIL.Image
import onnx_tools.pipeline, onnx_tools.collection, onnx_tools.cli.commands
from onnx_tools.cli import main
t1 = time.perf_counter()
rc = main(sys.argv[1:])
print(json.dumps({"imports": t1 - t0, "work": time.perf_counter() - t1, "rc": rc}))
sys.exit(rc)
"""

FVCORE = """
import json, sys, time
t0 = time.perf_counter()
import torch, torchvision
from pathlib import Path
from fvcore.nn.precise_bn import update_bn_stats
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets.folder import pil_loader
t1 = time.perf_counter()
name, state, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
model = getattr(torchvision.models, name)(weights=None)
model.load_state_dict(torch.load(state))
model.train()  # update_bn_stats recomputes the BN layers that are in training mode
tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                         transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
class Files(Dataset):
    def __init__(self, files):
        self.files = files
    def __len__(self):
        return len(self.files)
    def __getitem__(self, i):
        return tf(pil_loader(self.files[i]))
loader = DataLoader(Files(sorted(folder.rglob("*.jpg"))), batch_size=64, num_workers=2,
                    drop_last=True)
update_bn_stats(model, loader, num_iters=len(loader))
print(json.dumps({"imports": t1 - t0, "work": time.perf_counter() - t1}))
"""

PROBE = """
import json, sys, time
import numpy as np
from onnx_tools.analysis import analyze_model
from onnx_tools.data import BatchPlan, InputSpec, open_data
from onnx_tools.rewrite import build_collection_model
from onnx_tools.session import make_session
model, folder, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
analysis = analyze_model(model)
cm = build_collection_model(analysis.model, bns=analysis.batchnorms, training_kernel=True,
                            batch_size=batch)  # as the tool builds it for a CPU session
source = open_data(folder, InputSpec.from_model(analysis.model))
t = time.perf_counter()
feeds = [feed for _, feed in source.batches(BatchPlan(batch_size=batch))]
decode = time.perf_counter() - t
def timed(session, names, extra):
    session.run(names, {**feeds[0], **extra})  # warm-up, not counted
    t = time.perf_counter()
    for feed in feeds:
        session.run(names, {**feed, **extra})
    return time.perf_counter() - t
collection, _ = make_session(cm.model, "cpu")
original, _ = make_session(analysis.model, "cpu")
print(json.dumps({"decode": decode,
                  "collection_session": timed(collection, cm.output_names, cm.feeds),
                  "original_session": timed(original, None, {}), "batches": len(feeds)}))
"""


def make_images(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> None:
    """``count`` photo-like JPEGs: a smooth random colour field plus noise, quality 90."""
    from PIL import Image

    (folder / "photos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(count):
        field = rng.uniform(0, 255, size=(12, 16, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC))
        noisy = smooth.astype(np.float32) + rng.normal(0, 6, size=(h, w, 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        image.save(folder / "photos" / f"{i:05d}.jpg", quality=90)


def export_models(tmp: Path, names: tuple[str, ...] = MODELS) -> dict[str, tuple[Path, Path]]:
    """Each model as ONNX (BN kept, dynamic batch) and its torch state dict."""
    import warnings

    import torch
    import torchvision

    out = {}
    for name in names:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        onnx_path, state = tmp / f"{name}.onnx", tmp / f"{name}.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(onnx_path),
                              dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                              input_names=["input"], output_names=["logits"], opset_version=17,
                              dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
        torch.save(model.state_dict(), state)
        out[name] = (onnx_path, state)
    return out


def _anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _process(cmd: list[str], env: dict[str, str], cwd: Path) -> dict:
    """Run one route; its JSON line plus ``process`` (wall) and ``anon_peak_mb``."""
    peak = [0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def poll() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _anon_kb(proc.pid))
            time.sleep(0.01)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the routes run one at a time
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}):\n{err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(process=wall, cpu=cpu, anon_peak_mb=peak[0] / 1024)
    return result


def _routes(tmp: Path, models: dict, folder: Path, before: Path | None,
            after: Path = ROOT) -> dict[str, tuple]:
    py = sys.executable
    scripts = {}
    for key, text in (("plain", PLAIN), ("tool", TOOL), ("fvcore", FVCORE), ("probe", PROBE)):
        scripts[key] = tmp / f"route_{key}.py"
        scripts[key].write_text(text)
    env = {**os.environ, "PYTHONPATH": str(after)}
    routes = {}
    for name, (onnx_path, state) in models.items():
        tool = [py, str(scripts["tool"]), "recalibrate", str(onnx_path), "--data", str(folder),
                "-o", str(tmp / f"{name}.out.onnx"), "--batch-size", str(BATCH), "--quiet",
                "--provider", "cpu"]
        routes[(name, "plain")] = ([py, str(scripts["plain"]), str(onnx_path), str(folder),
                                    str(BATCH)], env)
        routes[(name, "recalibrate")] = (tool, env)
        if before is not None:
            routes[(name, "recalibrate_before")] = (tool, {**env, "PYTHONPATH": str(before)})
        routes[(name, "fvcore")] = ([py, str(scripts["fvcore"]), name, str(state), str(folder)],
                                    env)
    return routes


def _medians(times: dict, models: dict) -> dict:
    out = {}
    for name in models:
        plain = times[(name, "plain")]
        row = {"plain_work_s": statistics.median(r["work"] for r in plain),
               "plain_decode_s": statistics.median(r["decode"] for r in plain),
               "plain_session_s": statistics.median(r["session"] for r in plain)}
        for (model, route), results in times.items():
            if model != name:
                continue
            row[f"{route}_work_s"] = statistics.median(r["work"] for r in results)
            row[f"{route}_process_s"] = statistics.median(r["process"] for r in results)
            if route != "plain":
                row[f"{route}_ratio"] = statistics.median(
                    r["work"] / p["work"] for r, p in zip(results, plain, strict=True))
                row[f"{route}_process_ratio"] = statistics.median(
                    r["process"] / p["process"] for r, p in zip(results, plain, strict=True))
                row[f"{route}_cpu_ratio"] = statistics.median(
                    r["cpu"] / p["cpu"] for r, p in zip(results, plain, strict=True))
        out[name] = row
    return out


def _memory(tmp: Path, routes: dict, counts: tuple[int, int], folders: dict[int, Path]) -> dict:
    """Peak anonymous RSS of recalibrate (MobileNetV3-small) over two folder sizes."""
    out = {}
    for route in ("recalibrate", "recalibrate_before"):
        key = ("mobilenet_v3_small", route)
        if key not in routes:
            continue
        cmd, env = routes[key]
        for n in counts:
            changed = [str(folders[n]) if c == str(folders[counts[0]]) else c for c in cmd]
            result = _process(changed, env, tmp)
            out[f"{route}_{n}"] = {"anon_peak_mb": round(result["anon_peak_mb"], 1),
                                   "work_s": round(result["work"], 2)}
    return out


def run(images: int, rounds: int, before: Path | None, names: tuple[str, ...] = MODELS,
        after: Path = ROOT) -> dict:
    import onnxruntime
    import PIL
    import torch
    import torchvision

    tmp = Path(tempfile.mkdtemp(prefix="bnref-bench-images-"))
    big = 4 * images
    folders = {images: tmp / f"images{images}", big: tmp / f"images{big}"}
    make_images(folders[big], big)
    (folders[images] / "photos").mkdir(parents=True)
    for i in range(images):  # the small folder: hard links to the first images of the big one
        os.link(folders[big] / "photos" / f"{i:05d}.jpg",
                folders[images] / "photos" / f"{i:05d}.jpg")
    models = export_models(tmp, names)
    routes = _routes(tmp, models, folders[images], before, after)
    load_start = os.getloadavg()[0]
    for cmd, env in routes.values():  # warm the page cache and the interpreters
        _process(cmd, env, tmp)
    times: dict = {key: [] for key in routes}
    order = list(routes)
    for r in range(rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            times[key].append(_process(*routes[key], tmp))
    probe = {}
    for name, (onnx_path, _) in models.items():
        cmd = [sys.executable, str(tmp / "route_probe.py"), str(onnx_path), str(folders[images]),
               str(BATCH)]
        probe[name] = {k: round(v, 3) for k, v in
                       _process(cmd, routes[(name, "plain")][1], tmp).items()}
    memory = _memory(tmp, routes, (images, big), folders)
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_start": round(load_start, 2), "load_end": round(os.getloadavg()[0], 2)},
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "pillow": PIL.__version__,
                     "numpy": np.__version__},
        "images": images, "image_size": [500, 375], "batch_size": BATCH, "rounds": rounds,
        "before": str(before) if before else None,
        "after": str(after),
        "results": _medians(times, models),
        "raw": {f"{m}/{r}": [{k: round(v, 3) for k, v in x.items()} for x in t]
                for (m, r), t in times.items()},
        "probe": probe,
        "memory": memory,
        "date": time.strftime("%Y-%m-%d"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cell(row: dict, route: str, bold: bool = False) -> str:
    ratio = f"{row[route + '_ratio']:.2f}"
    return (f"{'**' + ratio + '**' if bold else ratio} ({row[route + '_process_ratio']:.2f}; "
            f"CPU {row.get(route + '_cpu_ratio', float('nan')):.2f})")


def markdown(data: dict) -> str:
    """The README table and notes from a results dict."""
    m, v = data["machine"], data["versions"]
    before = bool(data.get("before"))
    lines = [
        f"Measured {data['date']} on {m['cpu']}, {m['cores']} cores (shared; load average "
        f"{m['load_start']} at start, {m['load_end']} at the end); onnxruntime "
        f"{v['onnxruntime']}, torch {v['torch']}, torchvision {v['torchvision']}, pillow "
        f"{v['pillow']}. {data['images']} JPEGs of {data['image_size'][0]}x"
        f"{data['image_size'][1]}, batch {data['batch_size']}, {data['rounds']} interleaved "
        "rounds, medians of the within-round ratios over the plain loop (lower is better): "
        "*work* (after the imports), in brackets the whole process and the CPU time.",
        "",
        "| model | plain loop: work (decode + session) | `recalibrate` | "
        + ("before this change | " if before else "") + "fvcore `update_bn_stats` | target |",
        "|---|---:|---:|" + ("---:|" if before else "") + "---:|---:|",
    ]
    for name, row in data["results"].items():
        cells = [name, f"{row['plain_work_s']:.1f} s ({row['plain_decode_s']:.1f} + "
                       f"{row['plain_session_s']:.1f})", _cell(row, "recalibrate", bold=True)]
        if before:
            cells.append(_cell(row, "recalibrate_before"))
        cells += [_cell(row, "fvcore"), "≤ 1.3"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    parts = [f"{name}: decoding {p['decode']:.1f} s (the image pipeline alone), "
             f"collection model {p['collection_session']:.1f} s, original model "
             f"{p['original_session']:.1f} s" for name, p in data["probe"].items()]
    lines.append("Each part alone (one run, `session.run` over the decoded batches): "
                 + "; ".join(parts) + ".")
    mem = data["memory"]
    if mem:
        text = ", ".join(f"{k.rsplit('_', 1)[1]} images{' (before)' if 'before' in k else ''}: "
                         f"{x['anon_peak_mb']:.0f} MB" for k, x in mem.items())
        lines.append("Peak anonymous RSS of `recalibrate` (MobileNetV3-small): " + text + ".")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, default=None,
                        help="a tree of the code before a change (e.g. git archive HEAD)")
    parser.add_argument("--after", type=Path, default=ROOT,
                        help="the tree measured as recalibrate (default: this checkout)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument("--output", type=Path, default=OUT)
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.output.read_text())))
        return 0
    data = run(args.images, args.rounds, args.before, tuple(args.models), args.after)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=2) + "\n")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
