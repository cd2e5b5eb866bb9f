"""Files written whole or not at all, and the temporaries a killed write leaves behind.

    write_atomically(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp))
    write_text_atomically(folder / "run.json", text)
    remove_temporaries(folder)          # on the next start: what a kill cut off

A file is first written under a hidden temporary name beside it, `.{name}.tmp-{pid}`, flushed to disk and
then renamed into place (atomic on one file system), so a reader (another rank, a resumed run) sees the
old file or the new one, never half of one. When writing fails (a full disk, a folder turned read-only,
text that cannot be encoded), the temporary is deleted and the error goes on: nothing is left behind
but the old file. A process killed while writing leaves its temporary; `remove_temporaries` deletes
every one of that naming pattern (and the set-aside copies `.{name}.old-{pid}` of a checkpoint replaced
in place, and safetensors' own `.tmpXXXXXX`, as large as the weights), files and folders alike.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

# `.{name}.tmp-{pid}`, `.{name}.old-{pid}` (ours); `.tmpXXXXXX`: safetensors' own (its Rust writer creates the
# file under that name in the target's folder, sized to the whole file at once, then renames it)
TEMPORARY = re.compile(r"\..+\.(?:tmp|old)-\d+|\.tmp[A-Za-z0-9]{6}")


def temporary_path(path: Path) -> Path:
    """The hidden temporary a write of path goes to before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Replace path with what write(temporary path) writes: flushed to disk, made readable by all (0o644:
    safetensors creates its files 0o600), then renamed into place. If write raises, the temporary is
    deleted and the error goes on (path keeps its old content, if any)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; a failed write's leftover otherwise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace path with text (UTF-8, newlines as given) atomically; see write_atomically."""
    data = text.encode("utf-8")  # raises before any file exists for text that is not valid Unicode
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries (files or folders named like `.{name}.tmp-{pid}`, `.{name}.old-{pid}`) that
    interrupted writes left directly in folder; returns them. Call it where no other process is writing."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted(p for p in folder.iterdir() if TEMPORARY.fullmatch(p.name))
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found
