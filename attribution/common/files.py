"""Ground floor for files: atomic writes, integrity records, and readers that run no code.

Imports nothing of the project (torch only inside :func:`load_weights`), so every package may
use it.  Three promises:

* **Atomic writes.** Every file is written to a per-process temp name, then renamed: a kill
  leaves the old file or the new one, never half of one.
* **Verified reads.** A finished stage records the size and sha256 of each file it wrote
  (:func:`record_files`, kept in its ``stage.json``); :func:`verify_files` checks them before a
  later stage reads any, and a mismatch is ONE :class:`DataFileError` naming the file and how to
  rebuild it.  Nothing else is touched, so no finished work elsewhere is lost.
* **No code from data.** Pickles (the released rankings) go through :class:`SafeUnpickler`,
  which admits numpy arrays, dicts, lists, tuples and scalars and refuses every other global;
  torch files are read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

Dirs = Mapping[str, Path]  # stage name -> that stage's folder (what a stage function receives)


class DataFileError(RuntimeError):
    """A data or cached file is missing, corrupt, or does not match its record."""


# ----------------------------------------------------------------------------------- writing
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file + rename, so a kill never leaves a half-written file behind."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: ranks may race
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` into memory, then :func:`atomic_write_bytes` (zip members carry a CRC-32,
    so a flipped byte is found on read)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    # the temp name must not end in .npy: a kill would leave it where readers glob "*.npy"
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


# ------------------------------------------------------------------------- integrity records
# Written during a stage and never read by a later one: logs, and the checkpoints a stage
# resumes from (checked on their own when resumed: generator/train.py).
UNRECORDED_DIRS = ("logs", "wandb", "lightning_logs", "checkpoints")
UNRECORDED_FILES = ("stage.json", "config.yaml")


def record_files(folder: Path) -> dict[str, dict]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of every file a stage left."""
    folder = Path(folder)
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (not path.is_file() or rel.parts[0] in UNRECORDED_DIRS
                or str(rel) in UNRECORDED_FILES or ".tmp" in path.name):
            continue
        out[rel.as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def verify_files(folder: Path, record: dict[str, dict], rebuild: str) -> None:
    """Check every recorded file's size and sha256; fail naming the first bad one.

    Args:
        rebuild: what to tell the user, e.g. "delete runs/toy/features-ab12 and rerun
            `attribution features CONFIG`".
    """
    folder = Path(folder)
    for rel, want in record.items():
        path = folder / rel
        if not path.is_file():
            raise DataFileError(f"Cached file missing: {path}. To rebuild it, {rebuild}.")
        if path.stat().st_size != want["size"] or sha256_file(path) != want["sha256"]:
            raise DataFileError(f"Cached file is corrupt (its sha256 differs from the record "
                                f"made when it was written): {path}. To rebuild it, {rebuild}.")


# ----------------------------------------------------------------------------------- reading
def _present(path: Path, what: str, rebuild: str | None) -> tuple[Path, str]:
    """(the path, the rebuild hint for messages); a DataFileError when the file is absent."""
    path = Path(path)
    hint = f" To rebuild it, {rebuild}." if rebuild else ""
    if not path.is_file():
        raise DataFileError(f"{what} missing: {path}.{hint}")
    return path, hint


def read_json(path: Path, what: str = "file", rebuild: str | None = None) -> Any:
    """A JSON file, or a DataFileError that names it (missing, unreadable, not JSON)."""
    path, hint = _present(path, what, rebuild)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise DataFileError(f"{what} is corrupt: {path} ({err}).{hint}") from err


def load_npy(path: Path, what: str = "array file", mmap: bool = False,
             rebuild: str | None = None) -> np.ndarray:
    """A ``.npy`` file (no pickled objects), or a DataFileError naming it."""
    path, hint = _present(path, what, rebuild)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataFileError(f"{what} is unreadable: {path} ({err}).{hint}") from err


def load_npz(path: Path, what: str = "array file", rebuild: str | None = None
             ) -> dict[str, np.ndarray]:
    """Every member of an ``.npz`` read fully (so each member's CRC-32 is checked)."""
    path, hint = _present(path, what, rebuild)
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise DataFileError(f"{what} is corrupt: {path} ({err}).{hint}") from err


class SafeUnpickler(pickle.Unpickler):
    """Admits only what numpy arrays and plain containers need; any other global is refused
    before it can be called (``os.system``, ``builtins.eval``, a class's ``__reduce__``...)."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED or (
                module in ("numpy.dtypes", "numpy") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load '{module}.{name}': this file may hold "
                                     "only numpy arrays, dicts, lists and scalars")


def safe_pickle_load(path: Path, what: str = "pickle") -> Any:
    """Unpickle ``path`` with :class:`SafeUnpickler`; any failure is a DataFileError."""
    path, _ = _present(path, what, None)
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise DataFileError(f"{what} refused: {path}: {err}") from err
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OSError) as err:
        raise DataFileError(f"{what} is corrupt or not a pickle: {path} "
                            f"({err.__class__.__name__}: {err})") from err


def load_weights(path: Path, what: str = "weights file", rebuild: str | None = None) -> Any:
    """A torch file read with ``weights_only=True`` (tensors and plain containers only)."""
    import torch

    path, hint = _present(path, what, rebuild)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated / foreign files
        raise DataFileError(f"{what} is corrupt or holds more than weights: {path} "
                            f"({err.__class__.__name__}).{hint}") from err


class FolderBusyError(DataFileError):
    """Another process is writing the same run folder."""


_HELD: dict[str, list] = {}  # lock path -> [open file, depth]: re-entrant within a process


class FolderLock:
    """One writer per run folder: an exclusive ``fcntl`` lock on ``<folder>/.lock`` held while
    the block runs (re-entrant within a process: a pipeline that runs a second pipeline on its
    own folder keeps it).  A second process is refused with one line naming the holder's pid;
    the lock dies with its process, so a folder a killed run left behind is simply taken over.
    Ranks other than 0 of a distributed launch (RANK / LOCAL_RANK / SLURM_PROCID set and not 0)
    do not lock: their rank 0 holds the folder for them."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"

    @staticmethod
    def _worker() -> bool:
        return any(os.environ.get(v, "0") not in ("", "0")
                   for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))

    def __enter__(self) -> FolderLock:
        import fcntl

        key = str(self.path.resolve())
        if self._worker() or key in _HELD:
            _HELD.setdefault(key, [None, 0])[1] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held until __exit__)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise FolderBusyError(
                f"another attribution process (pid {holder}) is working in {self.path.parent}: "
                "wait for it to finish, or stop it; two writers would interleave their "
                "files") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        _HELD[key] = [handle, 1]
        return self

    def __exit__(self, *exc) -> None:
        key = str(self.path.resolve())
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            if held[0] is not None:
                held[0].close()  # releases the lock
            del _HELD[key]
