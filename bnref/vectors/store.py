"""Writing the vectors: byte-reproducible ``.npz`` files and a whole directory at once.

``.npz`` is a zip of ``.npy`` files. NumPy's ``savez`` stamps each member with the current
time; here every member gets the zip epoch (1980-01-01), so the same cases give the same bytes
and the manifest's sha256 sums are stable. bfloat16 has no ``.npy`` type NumPy can read back
(it would be written as an opaque void type): it is stored as its uint16 bit patterns, the
manifest naming the real dtype.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

_EPOCH = (1980, 1, 1, 0, 0, 0)


def encode(a: np.ndarray) -> tuple[np.ndarray, dict]:
    """``(array to store, its manifest entry)``: bfloat16 as uint16 bits, the rest as they are."""
    a = np.asarray(a)
    name = a.dtype.name
    stored = a.view(np.uint16) if name == "bfloat16" else a
    if stored.dtype.kind not in "fiub":
        raise TypeError(f"cannot store dtype {a.dtype} portably")
    entry = {"dtype": name, "stored_as": stored.dtype.name, "shape": list(a.shape)}
    if name == "bfloat16":
        entry["decode"] = "float32 bits = uint32(stored) << 16"
    return np.ascontiguousarray(stored), entry


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A deflated ``.npz`` of ``arrays`` (sorted by name), identical bytes for identical arrays."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def sha256(data: bytes) -> str:
    """Hex digest, as the manifest records each file's."""
    return hashlib.sha256(data).hexdigest()


def write_directory(out: Path, files: dict[str, bytes], manifest: dict) -> None:
    """Write ``files`` and ``manifest.json`` into the new directory ``out``, all or nothing.

    Everything is written into a temporary directory beside ``out`` and renamed into place,
    so a failure leaves no partial set. ``out`` must not exist, or be an empty directory:
    an existing set is never overwritten or mixed with another.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; give a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n"
        (tmp / "manifest.json").write_text(text)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
        os.chmod(out, 0o755)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
