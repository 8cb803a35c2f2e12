"""Writing result images without losing earlier ones: numbered names that do not exist yet, each file
written under a temporary name and then linked to its final name, so a full disk or a kill leaves no
truncated file under a final name, and no run replaces another's picture.
"""

from __future__ import annotations

import os
import re
from typing import Any

_NUMBERED = re.compile(r"^(\d+)_")


def check_writable_folder(folder: str, option: str = "--output_dir") -> None:
    """Create `folder` and prove a file can be written there, before anything slow starts."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{option} {folder} exists and is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"{option} {folder} is not writable: {err.strerror or err}") from None


def next_free_index(folder: str) -> int:
    """One past the highest NNN of the `NNN_*` files in `folder` (0 when there are none)."""
    if not os.path.isdir(folder):
        return 0
    numbers = [int(m.group(1)) for m in map(_NUMBERED.match, os.listdir(folder)) if m]
    return max(numbers, default=-1) + 1


def save_new_image(image: Any, folder: str, index: int, stem: str, **save_kwargs: Any) -> tuple[str, int]:
    """Save a PIL image as `folder/NNN_<stem>.png` with the first NNN >= index that is free; returns (path, NNN).

    The bytes go to a hidden temporary file first, which is then hard-linked to the final name: the link fails
    instead of replacing a file that appeared meanwhile (another run), and the name only ever holds a whole PNG.
    """
    tmp = os.path.join(folder, f".{stem}.tmp-{os.getpid()}.png")
    try:
        image.save(tmp, format="PNG", **save_kwargs)
        while True:
            path = os.path.join(folder, f"{index:03d}_{stem}.png")
            try:
                os.link(tmp, path)
                return path, index
            except FileExistsError:
                index += 1
            except OSError:  # a file system without hard links: check, then rename
                if os.path.exists(path):
                    index += 1
                    continue
                os.replace(tmp, path)
                return path, index
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
