"""Which files of a folder are calibration images: :func:`list_images`.

Files are taken by suffix (case-insensitive), recursively unless asked otherwise, and ordered
by relative POSIX path (``cat/1.png < cat/10.png < cat/2.png < dog/1.png``). Hidden entries,
names starting with ``.``, are skipped: hidden files (among them macOS's AppleDouble ``._*``
files, which carry an image suffix but hold no image) and hidden folders, which are not
entered (``.git``, ``.ipynb_checkpoints``, ...); :func:`list_images` counts them for a note.
Symbolic links to files are taken; links to folders are not followed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImageListing:
    """The image files of a folder, in order, and the hidden entries left out."""

    files: list[Path]
    hidden_files: int = 0
    hidden_folders: int = 0

    def hidden_note(self) -> str | None:
        """One note on the hidden entries skipped, or None when there were none."""
        if not (self.hidden_files or self.hidden_folders):
            return None
        parts = []
        if self.hidden_files:
            parts.append(f"{self.hidden_files} hidden image file(s)")
        if self.hidden_folders:
            parts.append(f"{self.hidden_folders} hidden folder(s)")
        return (
            f"skipped {' and '.join(parts)} (names starting with '.', e.g. macOS '._*' "
            "files)"
        )


def list_images(folder: Path, extensions: Sequence[str], recursive: bool = True) -> ImageListing:
    """Image files under ``folder`` with one of ``extensions`` (see the module docstring)."""
    suffixes = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    files: list[Path] = []
    hidden_files = hidden_folders = 0
    for root, dirs, names in os.walk(folder):
        hidden_folders += sum(d.startswith(".") for d in dirs)
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        for name in names:
            if os.path.splitext(name)[1].lower() not in suffixes:
                continue
            if name.startswith("."):
                hidden_files += 1
                continue
            path = Path(root, name)
            if path.is_file():
                files.append(path)
        if not recursive:
            break
    if not recursive:
        hidden_folders = 0  # not entered either way: nothing was left out
    files.sort(key=lambda p: p.relative_to(folder).as_posix())
    return ImageListing(files, hidden_files, hidden_folders)
