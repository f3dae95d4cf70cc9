"""The training cache: every volume of a split read once, pooled to ``data.image_size``
and stored in ONE memory-mapped array, so training reads a slice of one file instead of
decompressing a 256^3 ``processed.nii.gz`` per sample.

What is stored. Exactly what ``VolumeDataset`` returns for each file, in the list's order
(the same readers, the same average pooling, the same [0, 1] -> [-1, 1] map: the build
iterates a ``VolumeDataset``), shape (N, C, S, S, S), in

- float16 when the intensity recipe is a known CT recipe (``lidc``, ``rad``,
  ``official-rad``, ``phantom``): the rounding error against the direct read is at most
  ``FLOAT16_ERROR`` = 2^-12 (2.4e-4) for values inside (-1, 1) (2^-11 on the range
  slack just outside it), which is under half of one HU step for any window up to
  4,096 HU wide, i.e. below the precision the CT data has. Half the disk and memory of
  float32: 1,000 volumes at 128^3 are 4.2 GB.
- float32 when the recipe is ``unknown`` (no manifest: nothing says how fine the data
  is), or when ``data.cache_dtype: float32`` asks for it.

Which file. One file per (split, volume list, image_size, channels, intensity recipe,
dtype), named ``<split>-<S>-<list id>-<key>.cache`` in ``data.cache_dir`` (default
``$PRDIT_FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/prdit_fast/training``, i.e.
``~/.cache/prdit_fast/training``; shared by all runs, so stage 2 reuses stage 1's). The key
is a SHA-256 over all of those and each source's identity: its absolute path, size and
modification time in nanoseconds (``os.stat``; no content hash, so opening a cache of
1,000 volumes costs 1,000 ``stat`` calls, not reading 30 GB). A source rewritten in
place changes its mtime (and usually its size), hence the key, hence the file: the cache
is rebuilt, and the stale versions of the same list are deleted after the rebuild.
Copying sources with their mtimes preserved (``cp -p``, ``rsync -t``) keeps a cache
valid only if the path is the same too.

File format: a 16-byte magic, an 8-byte little-endian header length, a JSON header
(``key``, ``shape``, ``dtype``, the sources), zero padding to a multiple of 4,096 bytes,
then the C-contiguous array. ``open_cache`` checks magic, header, key, shape, dtype and
the file size before mapping it.

Safety. The file is written under a temporary name no reader matches
(``prdit_fast.atomic.atomic_path``: ``.NAME.tmp-XXXX``) and renamed when complete, so a
build killed at any point leaves at most a temporary file, which the next build of the
same cache deletes. Several processes (the ranks of a ``torchrun`` launch, two jobs)
asking for the same cache take an exclusive ``flock`` on ``.NAME.lock`` in the cache
folder: the first builds, the others wait and then open the finished file. (``flock``
needs a file system that implements it across the processes; node-local disks do.)
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..atomic import atomic_path, remove_stale_temps

log = logging.getLogger("prdit_fast.data")

MAGIC = b"PRDIT-CACHE\x00v1\n\x00"
assert len(MAGIC) == 16
_ALIGN = 4096
SUFFIX = ".cache"
# The transformation from source file to stored sample; part of the key, so a change of
# the dataset's recipe (readers, pooling, [-1, 1] map) invalidates every cache.
TRANSFORM = "VolumeDataset: to_canonical, average_pool, 2x-1 (v1)"
FLOAT16_ERROR = 2.0**-12  # max |cached - direct| for values inside (-1, 1) in float16
CT_RECIPES = ("lidc", "rad", "official-rad", "phantom")  # recipes whose precision float16 keeps
DTYPES = ("auto", "float16", "float32")


class CacheError(ValueError):
    """A cache file that is not what its name promises (truncated, another key, another
    format); the builder replaces it."""


def default_cache_dir() -> Path:
    """``$PRDIT_FAST_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/prdit_fast/training``
    (``~/.cache/prdit_fast/training``)."""
    if os.environ.get("PRDIT_FAST_CACHE_DIR"):
        return Path(os.environ["PRDIT_FAST_CACHE_DIR"])
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "prdit_fast" / "training"


def storage_dtype(choice: str, recipe: str) -> np.dtype:
    """The stored dtype for ``data.cache_dtype`` = ``choice`` and an intensity recipe
    (see the module docstring: auto is float16 for the CT recipes, else float32)."""
    if choice not in DTYPES:
        raise ValueError(f"data.cache_dtype must be one of {DTYPES}, got {choice!r}")
    if choice == "auto":
        choice = "float16" if recipe in CT_RECIPES else "float32"
    return np.dtype(choice)


@dataclass(frozen=True)
class CacheSpec:
    """Everything a cache's content depends on."""

    files: tuple[Path, ...]
    image_size: int
    in_channels: int
    recipe: str
    dtype: np.dtype
    split: str = "train"

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.image_size
        return (len(self.files), self.in_channels, s, s, s)

    def _identity(self) -> dict:
        return {"transform": TRANSFORM, "files": [str(f) for f in self.files], "image_size": self.image_size,
                "in_channels": self.in_channels, "recipe": self.recipe, "dtype": self.dtype.name, "split": self.split}

    def sources(self) -> list[list]:
        """[path, size, mtime_ns] of every source, now."""
        out = []
        for f in self.files:
            st = os.stat(f)
            out.append([str(f), st.st_size, st.st_mtime_ns])
        return out

    def list_id(self) -> str:
        """Hash of what the cache holds, without the sources' sizes and times: the stale
        versions of one list share it."""
        return _sha(self._identity())[:12]

    def key(self, sources: list[list]) -> str:
        return _sha({**self._identity(), "sources": sources})

    def file_name(self, key: str) -> str:
        return f"{self.split}-{self.image_size}-{self.list_id()}-{key[:16]}{SUFFIX}"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _header_bytes(header: dict) -> tuple[bytes, int]:
    body = json.dumps(header).encode()
    used = len(MAGIC) + 8 + len(body)
    offset = -(-used // _ALIGN) * _ALIGN
    return MAGIC + struct.pack("<Q", len(body)) + body + b"\0" * (offset - used), offset


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, data offset) of a cache file; CacheError when it is not one."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise CacheError(f"{path}: not a prdit_fast training cache (bad magic)")
        (length,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise CacheError(f"{path}: unreadable cache header ({e})") from e
    used = len(MAGIC) + 8 + length
    return header, -(-used // _ALIGN) * _ALIGN


class CachedVolumes(Dataset):
    """A finished cache as a dataset: item i is the float32 tensor (C, S, S, S) that
    ``VolumeDataset`` gives for file i (within the stored dtype's rounding). ``array`` is
    the whole (N, C, S, S, S) memory map. Picklable without the data (DataLoader
    workers map the file themselves)."""

    def __init__(self, path: Path, header: dict, offset: int):
        self.path, self.header, self.offset = Path(path), header, offset
        self.shape = tuple(header["shape"])
        self.dtype = np.dtype(header["dtype"])
        self.files = [Path(s[0]) for s in header["sources"]]
        self._array: np.memmap | None = None

    @property
    def array(self) -> np.memmap:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        return self._array

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[index], dtype=np.float32))  # a copy: the map is read-only

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


def open_cache(path: Path, spec: CacheSpec, key: str) -> CachedVolumes:
    """The cache at ``path``, checked against ``spec`` and ``key``; CacheError otherwise."""
    header, offset = read_header(path)
    want = {"key": key, "shape": list(spec.shape), "dtype": spec.dtype.name}
    for name, value in want.items():
        if header.get(name) != value:
            raise CacheError(f"{path}: cache {name} is {header.get(name)!r}, expected {value!r}")
    size, expected = path.stat().st_size, offset + int(np.prod(spec.shape)) * spec.dtype.itemsize
    if size != expected:
        raise CacheError(f"{path}: {size} bytes, a complete cache has {expected}")
    return CachedVolumes(path, header, offset)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("cache: another process is building %s; waiting for it", lock_path.name[1:-5])
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write(spec: CacheSpec, sources: list[list], key: str, tmp: Path, workers: int,
           progress: Callable[[int, int], None] | None) -> None:
    from torch.utils.data import DataLoader

    from .dataset import VolumeDataset

    header, offset = _header_bytes({"format": 1, "key": key, "shape": list(spec.shape), "dtype": spec.dtype.name,
                                    "split": spec.split, "image_size": spec.image_size, "recipe": spec.recipe,
                                    "transform": TRANSFORM, "sources": sources, "created": time.time()})
    with open(tmp, "wb") as f:
        f.write(header)
        f.truncate(offset + int(np.prod(spec.shape)) * spec.dtype.itemsize)
    out = np.memmap(tmp, dtype=spec.dtype, mode="r+", offset=offset, shape=spec.shape)
    volumes = VolumeDataset(list(spec.files), spec.image_size, spec.in_channels)
    # a private generator: building draws nothing from the global RNG, so a run that builds the
    # cache trains exactly like one that finds it
    loader = DataLoader(volumes, batch_size=None, num_workers=min(workers, len(volumes)),
                        generator=torch.Generator().manual_seed(0))
    for i, volume in enumerate(loader):  # in order: DataLoader keeps the index order
        out[i] = volume.numpy()
        if progress is not None:
            progress(i + 1, len(volumes))
    out.flush()
    del out


def _progress_logger(name: str) -> Callable[[int, int], None]:
    start = time.perf_counter()
    last = [start]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] >= 10:
            last[0] = now
            rate = done / max(now - start, 1e-9)
            log.info("cache %s: %d/%d volumes (%.1f volumes/s, %.0f s left)", name, done, total, rate,
                     (total - done) / max(rate, 1e-9))

    return report


def training_cache(spec: CacheSpec, cache_dir: str | os.PathLike | None = None, workers: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> CachedVolumes:
    """The cache of ``spec`` in ``cache_dir`` (default ``default_cache_dir()``), built
    first if it does not exist or does not check (see the module docstring); at most one
    process builds it, the others wait. ``workers``: reader processes of the build."""
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    sources = spec.sources()
    key = spec.key(sources)
    path = folder / spec.file_name(key)
    if path.is_file():
        with contextlib.suppress(CacheError):
            return open_cache(path, spec, key)
    with _exclusive(folder / f".{path.name}.lock"):
        if path.is_file():
            try:
                return open_cache(path, spec, key)  # another process built it while this one waited
            except CacheError as e:
                log.warning("cache: %s; rebuilding it", e)
        removed = remove_stale_temps(folder, owned=lambda target: target == path.name)
        if removed:
            log.info("cache: removed %d unfinished file(s) of a killed build", len(removed))
        need = int(np.prod(spec.shape)) * spec.dtype.itemsize
        free = shutil.disk_usage(folder).free
        if need > free:
            raise OSError(f"the training cache needs {need / 1e9:.2f} GB in {folder}, {free / 1e9:.2f} GB are free; "
                          f"set data.cache_dir to a larger disk, or data.cache: false to read the sources directly")
        log.info("cache: building %s (%d volumes, %s, %.2f GB) from %s ...", path, len(spec.files), spec.dtype.name,
                 need / 1e9, spec.files[0].parent if spec.files else "-")
        started = time.perf_counter()
        with atomic_path(path) as tmp:
            _write(spec, sources, key, tmp, workers, progress or _progress_logger(path.name))
        log.info("cache: built %s in %.1f s", path.name, time.perf_counter() - started)
        for old in folder.glob(f"{spec.split}-{spec.image_size}-{spec.list_id()}-*{SUFFIX}"):
            if old != path:
                old.unlink(missing_ok=True)
                (folder / f".{old.name}.lock").unlink(missing_ok=True)
                log.info("cache: removed %s (its sources have changed since)", old.name)
        return open_cache(path, spec, key)


def cached_split(files: Sequence[Path], data: dict, in_channels: int, recipe: str, split: str = "train",
                 cache_dir: str | os.PathLike | None = None) -> CachedVolumes:
    """The cache of a config's ``split`` (its ``files``, ``data.image_size``,
    ``data.cache_dtype``; built with ``data.num_workers`` readers), logging where it is."""
    spec = CacheSpec(tuple(Path(f).resolve() for f in files), int(data["image_size"]), int(in_channels), recipe,
                     storage_dtype(data.get("cache_dtype") or "auto", recipe), split)
    cached = training_cache(spec, cache_dir or data.get("cache_dir"), int(data.get("num_workers") or 0))
    log.info("data: %s cache %s (%d volumes, %s, %.2f GB)", split, cached.path, len(cached), cached.dtype.name,
             cached.nbytes / 1e9)
    return cached
