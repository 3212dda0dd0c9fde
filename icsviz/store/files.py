"""Opening run files for reading without raw HDF5 errors or hangs.

Three things go wrong with files that travel: they are cut short, they are
damaged inside, or a writer left HDF5's "open for writing" flags set. This
module turns each into a `RunFileError` that names the file:

- cut-short files are found from the end-of-file address in the superblock,
  before HDF5 sees them (HDF5's SWMR reader would retry for minutes);
- a file is opened in plain read mode when it can be, where a failed checksum
  fails at once; only a file that a writer has open (or left open when it was
  killed) is opened in SWMR mode, with HDF5's metadata retries bounded, since
  the default of 100 retries with back-off turns one flipped bit into a hang;
- every later read goes through `reading(...)`, which names the file and the
  dataset in a `DamagedRunError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import DamagedRunError, RunFileError

__all__ = [
    "open_for_reading",
    "not_a_run",
    "reading",
    "damaged",
    "short_rows",
    "read_attributes",
    "damage_hint",
    "truncation",
    "hdf5_library",
    "SWMR_READ_ATTEMPTS",
]

# Enough for a reader that races the writer (a mismatch there clears on the
# next try), few enough that a damaged block fails in milliseconds.
SWMR_READ_ATTEMPTS = 20
_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HDF5_FAILURES = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, UnicodeDecodeError)


def damage_hint(path: Path | str) -> str:
    return f"run `icsviz check {path}` to see what is damaged and `icsviz repair {path}` to save the rest"


@contextlib.contextmanager
def reading(path: Path | str, dataset: str) -> Iterator[None]:
    """Turn any failure of HDF5 while reading `dataset` into a `DamagedRunError`."""
    try:
        yield
    except RunFileError:
        raise
    except _HDF5_FAILURES as exc:
        short = _safe_truncation(Path(path))
        reason = "the file is " + short.split(" is ", 1)[-1] if short else _reason(exc)
        verdict = "the file is damaged: "
        if not short and _unknown_version(exc):
            verdict = (
                "if it was written with a newer HDF5, upgrade h5py here (pip install -U h5py); "
                "otherwise the file is damaged: "
            )
        raise damaged(path, dataset, reason, verdict) from exc


def damaged(
    path: Path | str, dataset: str, reason: str, verdict: str = "the file is damaged: "
) -> DamagedRunError:
    """The error for `dataset` of `path` that cannot be read for `reason`, with what to do."""
    return DamagedRunError(
        f"{path}: cannot read {dataset or 'the file'} ({reason}); {verdict}" + damage_hint(path),
        path=str(path),
        dataset=dataset,
        reason=reason,
    )


def short_rows(held: int, captures: int) -> str:
    """Why a per-capture dataset with fewer rows than the capture index is damage (the writer
    adds a capture's rows before its index entry: such a dataset was cut or edited)."""
    return f"it holds {held} rows for {captures} captures"


def read_attributes(obj: h5py.HLObject) -> Iterator[tuple[Any, Any, bool]]:
    """Every attribute of `obj`, read: (its low-level id, its value, whether the value is the
    stored bytes as they are). Through the low-level API (a deep model's run has some 6,000
    attributes: h5py's attribute manager was a third of reading them); variable-length and
    empty ones go through h5py's conversions (`str`, `h5py.Empty`)."""
    for index in range(h5py.h5a.get_num_attrs(obj.id)):
        attribute = h5py.h5a.open(obj.id, index=index)
        if attribute.dtype.kind == "O" or attribute.shape is None:
            yield attribute, obj.attrs[attribute.name.decode("utf-8")], False
            continue
        value = np.empty(attribute.shape, attribute.dtype)
        attribute.read(value)
        yield attribute, value, True


def _safe_truncation(path: Path) -> str:
    try:
        return truncation(path)
    except OSError:
        return ""


def _unknown_version(exc: BaseException) -> bool:
    """HDF5 met a format version it does not know: a part newer than this library, or damage."""
    return "bad version number" in str(exc)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip("'\" ")
    if "checksum" in text.lower() or "filter returned failure" in text:
        return "its checksum does not match: the bytes changed after they were written"
    if _unknown_version(exc):
        return f"HDF5 {h5py.version.hdf5_version} does not know a format version in it: {text.split('(', 1)[-1].rstrip(')')}"
    if "object header" in text or "synchronously open object" in text:
        return f"its HDF5 structure is broken: {text.split('(', 1)[-1].rstrip(')')}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _stored_end_of_file(path: Path) -> int | None:
    """The end-of-file address that the HDF5 superblock records, if it can be read."""
    with open(path, "rb") as stream:
        for base in (0, 512, 1024, 2048, 4096, 8192):  # the superblock may follow a user block
            stream.seek(base)
            head = stream.read(64)
            if head[:8] != _SIGNATURE:
                continue
            version = head[8]
            if version in (2, 3):
                size = head[9]
                offset = 12 + 2 * size  # base address, superblock extension address
            elif version in (0, 1):
                size = head[13]
                offset = 24 + (4 if version == 1 else 0) + 2 * size  # base, free-space addresses
            else:
                return None
            if size not in (4, 8):
                return None
            return base + int.from_bytes(head[offset : offset + size], "little")
    return None


def truncation(path: Path) -> str:
    """A sentence when the file is shorter than its superblock says, else ""."""
    stored_eof = _stored_end_of_file(path)
    size = path.stat().st_size
    if stored_eof is None or size >= stored_eof:
        return ""
    return (
        f"{path} is truncated: {size} bytes on disk, the file says {stored_eof} (it was cut short "
        "while being copied or written, or the disk filled up)"
    )


def _hdf5_library() -> ctypes.CDLL | None:
    """The HDF5 library that h5py uses, for the one setting h5py does not expose."""
    here = os.path.dirname(h5py.__file__)
    candidates = glob.glob(os.path.join(here, "..", "h5py.libs", "libhdf5-*.so*"))  # Linux wheels
    candidates += glob.glob(os.path.join(here, ".dylibs", "libhdf5*.dylib"))  # macOS wheels
    candidates += [
        line.split()[-1] for line in _mapped_libraries() if "libhdf5." in line or "libhdf5-" in line
    ]
    for candidate in candidates:
        if "_hl" in os.path.basename(candidate):
            continue
        try:
            lib = ctypes.CDLL(candidate)
            lib.H5Pset_metadata_read_attempts  # noqa: B018 - present since HDF5 1.10
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _mapped_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            return [line.strip() for line in maps if "libhdf5" in line]
    except OSError:
        return []


_LIBRARY: ctypes.CDLL | None | bool = False  # False: not looked up yet


def hdf5_library() -> ctypes.CDLL | None:
    """h5py's own HDF5 library, for the few settings h5py does not expose (None: not found)."""
    global _LIBRARY
    if _LIBRARY is False:
        _LIBRARY = _hdf5_library()
    return _LIBRARY or None


def _swmr_access_list() -> h5py.h5p.PropFAID:
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    library = hdf5_library()
    if library is not None:
        library.H5Pset_metadata_read_attempts(ctypes.c_int64(fapl.id), ctypes.c_uint(SWMR_READ_ATTEMPTS))
    return fapl


def _open_swmr(path: Path) -> h5py.File:
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, _swmr_access_list())
    return h5py.File(fid)


def open_for_reading(path: Path) -> tuple[h5py.File, bool]:
    """(file, swmr): a run file opened for reading, or a `RunFileError` saying why not.

    `swmr` is True when a writer has the file open (or was killed with it
    open): the reader must then refresh to see new rows.
    """
    if not path.exists():
        raise RunFileError(f"{path}: no such run file")
    if path.is_dir():
        raise RunFileError(
            f"{path} is a folder, not a run file: open one of the .h5 files in it "
            f"(`icsviz app {path}` lists them all)"
        )
    size = path.stat().st_size
    if size == 0:
        raise RunFileError(f"{path} is empty (0 bytes): the run never wrote its header")
    if not h5py.is_hdf5(path):
        raise RunFileError(f"{path} is not an HDF5 file ({size} bytes without an HDF5 signature)")
    file, swmr = _open_hdf5(path)
    return _a_run(path, file), swmr


def _open_hdf5(path: Path) -> tuple[h5py.File, bool]:
    short = truncation(path)
    if short:
        # A disk that filled up mid-run leaves the committed captures intact in
        # front of the missing end: the SWMR reader gets at them, plain HDF5 refuses.
        try:
            return _open_swmr(path), True
        except _HDF5_FAILURES:
            raise RunFileError(short) from None
    try:
        return h5py.File(path, "r", locking=False), False
    except OSError as exc:
        plain_error = exc
    try:  # a live writer (in this process too), or one killed with the file open
        return _open_swmr(path), True
    except _HDF5_FAILURES:
        raise _unopenable(path, plain_error) from plain_error


def not_a_run(path: Path) -> RunFileError:
    return RunFileError(f"{path} is HDF5 but not an icsviz run (no schema_version)")


def _a_run(path: Path, file: h5py.File) -> h5py.File:
    """`file`, unless it is another program's HDF5 file (then closed, and a RunFileError): neither
    the version attribute nor the capture index is there. A damaged icsviz file still shows one
    of them, or fails to say, and is left to the reader and the check to locate."""
    try:
        foreign = "schema_version" not in file.attrs and "captures" not in file
    except Exception:  # noqa: BLE001 - unreadable attributes or links: damage, not another program's file
        foreign = False
    if foreign:
        file.close()
        raise not_a_run(path)
    return file


def _unopenable(path: Path, exc: BaseException) -> RunFileError:
    text = str(exc)
    if "values don't match" in text or "degree doesn't match" in text:
        return RunFileError(
            f"{path} is already open in this process with other HDF5 settings (h5py.File?); close "
            "that handle, then open it again"
        )
    if "truncated" in text:
        return RunFileError(f"{path} is truncated (it was cut short while being copied or written)")
    return DamagedRunError(
        f"{path} cannot be opened as HDF5 ({_reason(exc)}); its header is damaged and nothing in it "
        "can be read",
        path=str(path),
    )
