"""``prdit-fast features``: transformer token features of many volumes, resumable.

    prdit-fast features --ckpt stage2.pt --blocks 5 --out FEATS data/processed/

For each input volume (preprocessed volumes as training reads them: ``.npy`` from
``prdit-fast preprocess``, the official LIDC ``.nii.gz`` and RAD-ChestCT ``.npz``; given
as files, folders searched recursively, or split-list files; ``prdit_fast.data``), the
network's residual stream after each block of ``--blocks`` at timestep ``--t`` (default
50, the official encode mode's) is written to ``DIR/features_<name>.npy`` as a float32
array (len(blocks), N, hidden) in the order of ``--blocks``, or to
``DIR/features_<name>.safetensors`` with one (N, hidden) tensor per block under
``block_<i>``. ``--blocks 5 --t 50`` is the official ``mode="encode"`` /
``get_vlm_features``. The fast backend runs only what the features need (the unfold, the
timestep MLP, the patch embedder and the blocks up to the last one asked for; no local
denoiser, no final layer), GEMMs in the compute dtype with an fp32 residual stream.

Same guarantees as ``sample``: the folder is claimed for one run (checkpoint hash, inputs
and every argument that changes the bytes; ``prdit_fast.run_claims``), another run is
refused; files are written atomically; volumes are processed in fixed batch groups, so a
killed run restarted with the same command computes only the missing groups and ends
with the same bytes. ``DIR/manifest.json`` maps each source to its file (shape, dtype,
blocks, t); ``DIR/summary.json`` keeps a record of every invocation.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from prdit_fast.atomic import atomic_path, remove_stale_temps, write_json
from prdit_fast.errors import UsageError
from prdit_fast.interface import ENCODE_BLOCK, ENCODE_TIMESTEP
from prdit_fast.run_claims import check_out_folder, claim_run_folder
from prdit_fast.sample_runs import append_record, batch_groups, file_sha256

log = logging.getLogger("prdit_fast")

PREFIX = "features_"
FORMATS = ("npy", "safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prdit_fast.pipeline import DTYPES

    parser.add_argument("inputs", nargs="+", help="volume files, folders (searched recursively) or split-list files")
    parser.add_argument("--ckpt", required=True, help="checkpoint file (official .pt, prdit_fast, or a bare state dict)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--blocks", default=str(ENCODE_BLOCK),
                        help=f"comma-separated block indices to save (default {ENCODE_BLOCK}: the official encode mode)")
    parser.add_argument("--t", type=float, default=ENCODE_TIMESTEP,
                        help=f"timestep the features are taken at (default {ENCODE_TIMESTEP}; IaN: an integer step, "
                             f"flow matching: 1000 t)")
    parser.add_argument("--batch-size", type=int, default=1, help="volumes per batch (default 1)")
    parser.add_argument("--format", choices=FORMATS, default="npy", help="file format of the features")
    parser.add_argument(
        "--backend", choices=("auto", "fast", "reference"), default="auto",
        help="fast (Triton/CUDA kernels, only the blocks needed) or reference; auto: fast on CUDA",
    )
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="compute dtype; auto: bf16 on CUDA, fp32 on CPU (features are saved in fp32)")
    parser.add_argument("--variant", help="variant name, e.g. PRDiT-B/12/12 (needed for bare state dicts)")
    parser.add_argument("--size", type=int, help="volume edge S (needed for bare state dicts)")
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights instead of the EMA copy")
    parser.add_argument("--device", help="torch device; default cuda when available, else cpu")


def parse_blocks(text: str) -> list[int]:
    """'5' or '3,5' -> [5] / [3, 5] (order kept, duplicates dropped); UsageError otherwise."""
    blocks: list[int] = []
    for part in text.split(","):
        try:
            block = int(part.strip())
        except ValueError:
            raise UsageError(f"--blocks must be comma-separated block indices such as 5 or 3,5; got {text!r}") from None
        if block not in blocks:
            blocks.append(block)
    return blocks


def input_volumes(inputs: list[str]) -> list[Path]:
    """The volume files named by ``inputs`` (files, folders searched recursively, split
    lists), sorted per input, each once. UsageError when there are none."""
    from prdit_fast.data.dataset import is_volume_file, list_volume_files

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        try:
            found = [path] if path.is_file() and is_volume_file(path) else list_volume_files(path)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"input {item}: {e}") from None
        files += [f for f in found if f not in files]
    return files


def feature_path(out: Path, name: str, fmt: str) -> Path:
    return out / f"{PREFIX}{name}.{fmt}"


def _write(path: Path, features: dict[str, torch.Tensor], blocks: list[int], fmt: str) -> list[int]:
    """One volume's features, atomically; returns the stored shape."""
    arrays = [features[f"block_{b}"].float().cpu().contiguous() for b in blocks]
    with atomic_path(path) as tmp:
        if fmt == "npy":
            stacked = torch.stack(arrays).numpy()
            with open(tmp, "wb") as f:
                np.save(f, stacked)
            return list(stacked.shape)
        from safetensors.torch import save_file

        save_file({f"block_{b}": a for b, a in zip(blocks, arrays)}, str(tmp), metadata={"blocks": json.dumps(blocks)})
    return [len(blocks), *arrays[0].shape]


def _inputs_digest(files: list[Path], names: list[str]) -> str:
    text = "\n".join(f"{f.resolve()}\t{n}" for f, n in zip(files, names))
    return hashlib.sha256(text.encode()).hexdigest()


def run(args: argparse.Namespace, on_volume: Callable[[int, Path], None] | None = None) -> int:
    """Extract the features of the volumes not yet on disk, then write the manifest and
    the summary. ``on_volume(index, path)`` runs after each file is written."""
    from tqdm.auto import tqdm

    from prdit_fast.commands.sample import build_model
    from prdit_fast.data.dataset import VolumeDataset
    from prdit_fast.data.preprocess import output_names
    from prdit_fast.devices import resolve_device

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not Path(args.ckpt).is_file():
        raise UsageError(f"--ckpt {args.ckpt!r} is not a file")
    blocks = parse_blocks(args.blocks)
    out = check_out_folder(args.out)
    files = input_volumes(args.inputs)
    names = output_names(files)
    device = resolve_device(args.device, 0)
    model, dtype, backend = build_model(args, device)
    cfg = model.config
    if getattr(cfg, "base", None) is not None:
        raise UsageError("--ckpt holds a PRDiT-SR wrapper; features come from a PRDiT (its base checkpoint)")
    if cfg.norm == "rms":
        raise UsageError(f"{cfg.name} is a TF-PRDiT model, whose official interface has no feature extraction")
    bad = [b for b in blocks if not 0 <= b < cfg.depth]
    if bad:
        raise UsageError(f"--blocks {bad[0]} is outside the valid range [0, {cfg.depth}) of {cfg.name}'s blocks")
    t_value = int(args.t) if cfg.process == "ian" and float(args.t).is_integer() else float(args.t)
    identity = {
        "checkpoint_sha256": file_sha256(args.ckpt), "inputs_sha256": _inputs_digest(files, names),
        "num": len(files), "blocks": blocks, "t": t_value, "ema": not args.no_ema, "dtype": args.dtype,
        "backend": args.backend, "batch_size": args.batch_size, "format": args.format, "variant": args.variant,
        "size": args.size,
    }
    dataset = VolumeDataset(files, cfg.input_size, cfg.in_channels)
    with claim_run_folder(out, identity, outputs=(f"{PREFIX}*",)):
        remove_stale_temps(out, owned=lambda name: name.startswith(PREFIX))
        paths = [feature_path(out, n, args.format) for n in names]
        groups = [g for g in batch_groups(range(len(files)), args.batch_size) if not all(paths[i].exists() for i in g)]
        todo = sum(1 for g in groups for i in g if not paths[i].exists())
        if len(files) - todo:
            log.info("%d of %d feature files already on disk; extracting %d", len(files) - todo, len(files), todo)
        started, written = time.perf_counter(), 0
        bar = tqdm(total=todo, unit="vol", desc="features", dynamic_ncols=True)
        try:
            for group in groups:
                x = torch.stack([dataset[i] for i in group]).to(device)
                t = torch.full((len(group),), t_value, device=device)
                # the reference runs its fp32 weights, under autocast for a 16-bit --dtype
                autocast = backend == "reference" and dtype != torch.float32
                with torch.no_grad(), torch.autocast(device.type, dtype, enabled=autocast):
                    feats = model.hidden_features(x, t, blocks)
                for j, index in enumerate(group):
                    if paths[index].exists():
                        continue
                    one = {k: v[j] for k, v in feats.items()}
                    if not all(torch.isfinite(v).all() for v in one.values()):
                        raise RuntimeError(f"the features of {files[index]} have NaN or Inf values; nothing was written for it")
                    _write(paths[index], one, blocks, args.format)
                    written += 1
                    bar.update(1)
                    if on_volume is not None:
                        on_volume(index, paths[index])
        finally:
            bar.close()
        elapsed = time.perf_counter() - started
        shape = [len(blocks), cfg.num_tokens, cfg.hidden]
        manifest = {
            "checkpoint": str(args.ckpt), "variant": cfg.name, "size": cfg.input_size, "blocks": blocks, "t": t_value,
            "layout": ("npy: float32 (len(blocks), N, hidden), blocks in the order above" if args.format == "npy"
                       else "safetensors: float32 (N, hidden) per block under block_<i>"),
            "shape": shape, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
            "volumes": [{"source": str(f), "file": p.name, "done": p.exists()} for f, p in zip(files, paths)],
        }
        manifest["complete"] = all(v["done"] for v in manifest["volumes"])
        write_json(out / "manifest.json", manifest)
        summary = {"checkpoint": str(args.ckpt), "identity": identity, "volumes_written": written,
                   "volumes_skipped": len(files) - todo, "seconds": round(elapsed, 3),
                   "volumes_per_second": round(written / elapsed, 3) if written else None,
                   "backend": backend, "device": str(device)}
        append_record(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    return 0
