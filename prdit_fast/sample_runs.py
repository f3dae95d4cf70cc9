"""A ``prdit-fast sample`` output folder belongs to one run, and a resumed run ends with
the same bytes as an uninterrupted one.

- Identity: the checkpoint's SHA-256 and every argument that changes the bytes of a
  volume (seed, sampler, steps, k, saved quantity, weights, compute dtype, backend,
  batch size, number of volumes, world size, format) claim the folder atomically
  (``prdit_fast.run_claims.claim_run_folder``), so two runs never mix in one folder.
- Fixed groups: rank r's volumes are cut into consecutive groups of ``batch_size``
  (``batch_groups``) and a group is always sampled whole, so every volume is computed in
  the same batch whatever was already on disk when the run (re)started.
- Records: every invocation appends its record to the summary file (``append_record``);
  earlier records are kept.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .atomic import atomic_path

def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file; of a folder (a model folder), over its files' names and SHA-256s."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        return hashlib.sha256("".join(f"{p.name}\0{file_sha256(p, chunk)}\n" for p in files).encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def batch_groups(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """``indices`` cut into consecutive groups of ``batch_size`` (the last may be shorter)."""
    indices = list(indices)
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def append_record(path: Path, record: Mapping[str, Any]) -> dict:
    """Add ``record`` to the ``runs`` list of the JSON summary at ``path`` (created when
    absent; a summary of the older single-record form becomes the first entry)."""
    summary: dict = {"runs": []}
    if path.is_file():
        old = json.loads(path.read_text())
        summary = old if isinstance(old.get("runs"), list) else {"runs": [old]}
    summary["runs"].append(dict(record))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def network_summary(model: torch.nn.Module) -> dict:
    """What ran, read from the network object itself (not from the checkpoint's metadata):
    its variant name, edge, normalization, process (from its head) and parameter count."""
    cfg = model.config
    base = getattr(cfg, "base", cfg)  # PRDiT-SR ("PRDiT-SR(base name)"): the wrapped network's norm and head
    return {"variant": cfg.name, "size": cfg.input_size, "norm": base.norm, "process": base.process,
            "parameters": sum(p.numel() for p in model.parameters())}
