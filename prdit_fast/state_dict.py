"""What a PRDiT state dict says by its keys and shapes, shared by checkpoint loading
(``prdit_fast.checkpoint``) and by wrapping foreign modules (``fast.accelerate``)."""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from .models import SIZES, canonical_name

_BLOCK_RE = re.compile(r"^fine\.blocks\.(\d+)\.")


def _geometry_from_rows(coarse_rows: int, out_rows: int) -> tuple[int, int, int, int] | None:
    """(in_channels C, patch p, stride s, out_channels Cout) with C p^3 = coarse_rows and
    s^3 Cout = out_rows, Cout in {2C, C}, s <= p, p - s even; the fewest channels first
    (CT has one). For a given C the head is unambiguous: s^3 = 2 s'^3 has no integer
    solution."""
    for channels in range(1, coarse_rows + 1):
        if coarse_rows % channels:
            continue
        patch = round((coarse_rows // channels) ** (1 / 3))
        if channels * patch**3 != coarse_rows:
            continue
        for out_channels in (2 * channels, channels):
            stride = round((out_rows / out_channels) ** (1 / 3))
            if stride >= 1 and stride**3 * out_channels == out_rows and stride <= patch and (patch - stride) % 2 == 0:
                return channels, patch, stride, out_channels
    return None


def infer_architecture(state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """What a state dict's shapes say about the network, or None when the keys needed
    are absent: ``hidden`` (rows of t_embedder.mlp.0), ``patch`` and ``in_channels``
    (rows of coarse_head = C p^3), ``stride`` and ``out_channels`` (rows of linear_final =
    s^3 Cout, Cout = 2C for IaN or C for flow matching), ``pad`` ((p - s) / 2), ``depth``
    (highest fine.blocks.N + 1), ``name`` (the variant name when hidden is a named size)
    and ``evidence`` (a sentence for error messages)."""
    try:
        hidden = state["t_embedder.mlp.0.weight"].shape[0]
        coarse_rows = state["t_embedder.coarse_head.weight"].shape[0]
        out_rows = state["coarse.mlp_denoise.linear_final.weight"].shape[0]
    except (KeyError, AttributeError, IndexError):
        return None
    geometry = _geometry_from_rows(coarse_rows, out_rows)
    if geometry is None:
        return None
    channels, patch, stride, out_channels = geometry
    blocks = [int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k))]
    depth = max(blocks) + 1 if blocks else 0
    size = next((s for s, (h, _) in SIZES.items() if h == hidden), None)
    try:
        name = canonical_name(f"{size}/{patch}/{depth}-s{stride}") if size else None
    except ValueError:
        name = None
    head = "velocity (flow matching)" if out_channels == channels else "[eps_hat, x0_hat] (IaN)"
    evidence = (
        f"hidden {hidden} (t_embedder.mlp.0), patch {patch} (t_embedder.coarse_head has {coarse_rows} = "
        f"{channels} x {patch}^3 rows), stride {stride} and {out_channels} output channels "
        f"(linear_final has {out_rows} = {stride}^3 x {out_channels} rows: {head}), depth {depth} ("
        + (f"highest block fine.blocks.{depth - 1}" if depth else "no fine.blocks")
        + f"), in_channels {channels}"
    )
    return {
        "hidden": hidden,
        "patch": patch,
        "stride": stride,
        "pad": (patch - stride) // 2,
        "depth": depth,
        "in_channels": channels,
        "out_channels": out_channels,
        "name": name,
        "evidence": evidence,
    }
