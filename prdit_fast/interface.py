"""The official PRDiT module's calling interface (spec section 16), written once for the
reference (``models.PRDiT``) and the fast backend (``fast.FastPRDiT``).

Scripts written for the official code call the network as

    model(x, t, y=None)                              # t: (B,) tensor, 0-d tensor or Python int
    model(x, t, return_intermediate=True)            # (coarse volume, fine volume), depth > 0
    model(x, mode="encode")                          # (B, N, hidden) after block 5; t defaults to 50
    model.get_vlm_features(x)                        # the same under no_grad
    model.extract_transformer_hidden_features(x, t, capture_layers=[3, 5], include_patch_embed=True)
    model.freeze_coarse_path(); model.load_coarse_checkpoint("stage1.pt")

``OfficialInterface`` turns these calls into the computations each backend provides, with
``t`` already a (B,) tensor:

    denoise(x, t)        -> (B, Cout, S, S, S)                       the network output
    denoise_parts(x, t)  -> (coarse, fine), each (B, Cout, S, S, S)  stage-1 part, residual part
    hidden_features(x, t, blocks, patch_embed, final) -> {"patch_embed", "block_i", "final": (B, N, hidden)}

``hidden_features`` runs only the unfold, the timestep MLP and fine head, the patch
embedder and the transformer blocks up to the last one asked for: no local denoiser and
no final layer. The TF-PRDiT models (``norm == "rms"``, the ``DiT-`` names) have the
official DiT class's smaller interface ``forward(input, t, y=None,
return_intermediate=False)``: no encode mode and no feature helpers (TypeError).
"""
from __future__ import annotations

import numbers
import os
from typing import Iterable, Mapping, Sequence

import torch

from .checkpoint_read import read_checkpoint, strip_wrapper_prefixes

MODES = ("denoise", "encode")
ENCODE_BLOCK = 5  # mode="encode" returns the tokens after block index 5 (the sixth block)
ENCODE_TIMESTEP = 50  # the timestep of mode="encode" and get_vlm_features when none is given


def batch_timesteps(t: torch.Tensor | int | float | None, x: torch.Tensor) -> torch.Tensor:
    """``t`` as the official forward accepts it -> a (B,) tensor on ``x``'s device.

    A 1-d tensor is used as given (its length is checked with the input), a 0-d tensor is
    expanded to the batch, a Python int (IaN step) or float (flow matching's 1000 t) becomes
    a full batch of that value. None is a ValueError (only mode="encode" has a default)."""
    if t is None:
        raise ValueError(
            "t is required in mode='denoise': pass the timestep as a (B,) tensor, a 0-d tensor or a Python int"
        )
    if isinstance(t, bool) or (isinstance(t, torch.Tensor) and t.dtype == torch.bool):
        raise TypeError("t must be an integer IaN step or a float flow-matching time 1000 t, got a bool")
    if isinstance(t, numbers.Integral):
        return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    if isinstance(t, numbers.Real):
        return torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a (B,) tensor, a 0-d tensor or a Python int, got {type(t).__name__}")
    if t.dim() == 0:
        return t.to(x.device).reshape(1).expand(x.shape[0])
    if t.dim() != 1:
        raise ValueError(f"t must be a (B,) tensor, a 0-d tensor or a Python int, got a tensor of shape {tuple(t.shape)}")
    return t.to(x.device)


def capture_indices(capture_layers: int | Sequence[int] | None, depth: int, name: str) -> list[int]:
    """The block indices ``extract_transformer_hidden_features`` captures: an int, a
    sequence of ints (duplicates dropped, order kept) or None (``depth // 2``). ValueError
    names the valid range [0, depth) for an index outside it."""
    if capture_layers is None:
        layers: Iterable = [depth // 2]
    elif isinstance(capture_layers, numbers.Integral) and not isinstance(capture_layers, bool):
        layers = [capture_layers]
    elif isinstance(capture_layers, Iterable) and not isinstance(capture_layers, (str, bytes)):
        layers = list(capture_layers)
    else:
        raise TypeError(f"capture_layers must be an int, a sequence of ints or None, got {capture_layers!r}")
    indices: list[int] = []
    for layer in layers:
        if isinstance(layer, torch.Tensor) and layer.dim() == 0 and not layer.is_floating_point():
            layer = int(layer)
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"capture_layers must hold block indices (ints), got {layer!r}")
        if not 0 <= layer < depth:
            raise ValueError(
                f"capture_layers {int(layer)} is outside the valid range [0, {depth}) of {name}'s {depth} blocks"
            )
        if int(layer) not in indices:
            indices.append(int(layer))
    return indices


def last_block(depth: int, blocks: Sequence[int], final: bool, name: str) -> int:
    """The last block ``hidden_features`` must run for ``blocks`` (and ``final``: all of
    them); RuntimeError at depth 0, ValueError for nothing requested or an index outside
    [0, depth)."""
    if depth == 0:
        raise RuntimeError(f"{name} has no transformer (depth 0): there are no hidden features")
    if not blocks and not final:
        raise ValueError("hidden_features needs at least one block index (or final=True)")
    capture_indices(list(blocks), depth, name)
    return depth - 1 if final else max(blocks)


class OfficialInterface:
    """Spec section 16 over ``denoise`` / ``denoise_parts`` / ``hidden_features``; mixed into
    ``PRDiT`` and ``FastPRDiT`` (whose ``config`` is a ``PRDiTConfig``)."""

    def _model_name(self) -> str:
        return self.config.name or "this PRDiT"

    def _check_full_interface(self, what: str) -> None:
        if self.config.norm == "rms":
            raise TypeError(
                f"{self._model_name()} is a TF-PRDiT model (the official DiT class): its interface is "
                f"forward(input, t, y=None, return_intermediate=False), without {what}; encoder features come "
                f"from the PRDiT-... models with depth >= {ENCODE_BLOCK + 1}"
            )

    def forward(
        self,
        input: torch.Tensor,
        t: torch.Tensor | int | float | None = None,
        y: object = None,
        return_intermediate: bool = False,
        mode: str = "denoise",
    ):
        """input (B, C, S, S, S); ``y`` is accepted and ignored (the official samplers pass
        ``y=None``). mode="denoise": (B, Cout, S, S, S), or with ``return_intermediate`` and
        depth > 0 the pair (coarse volume, fine volume) whose sum that is. mode="encode":
        the tokens after block 5, (B, N, hidden) (depth >= 6; t None means 50)."""
        del y  # the official class-conditioning slot: every official config leaves it unused
        if mode != "denoise":
            self._check_full_interface("mode=" + repr(mode))
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if mode == "encode":
            return self.encode(input, ENCODE_TIMESTEP if t is None else t)
        t = batch_timesteps(t, input)
        if return_intermediate and self.config.depth > 0:
            return self.denoise_parts(input, t)
        return self.denoise(input, t)

    def encode(self, input: torch.Tensor, t: torch.Tensor | int | float = ENCODE_TIMESTEP) -> torch.Tensor:
        """The token features after block 5, (B, N, hidden): ``forward(input, t, mode="encode")``."""
        self._check_full_interface("mode='encode'")
        depth = self.config.depth
        if depth <= ENCODE_BLOCK:
            raise RuntimeError(
                f"mode='encode' needs a transformer of depth >= {ENCODE_BLOCK + 1} (it returns the tokens after "
                f"block {ENCODE_BLOCK}); {self._model_name()} has depth {depth}"
            )
        key = f"block_{ENCODE_BLOCK}"
        return self.hidden_features(input, batch_timesteps(t, input), [ENCODE_BLOCK])[key]

    def get_vlm_features(
        self, x: torch.Tensor, timestep: torch.Tensor | int | float = ENCODE_TIMESTEP, no_grad: bool = True,
        detach: bool = False,
    ) -> torch.Tensor:
        """``forward(x, t=timestep, mode="encode")``, under ``torch.no_grad()`` when ``no_grad``;
        ``detach`` detaches the result."""
        self._check_full_interface("get_vlm_features")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not no_grad):
            features = self.encode(x, timestep)
        return features.detach() if detach else features

    def extract_transformer_hidden_features(
        self,
        input: torch.Tensor,
        t: torch.Tensor | int | float,
        y: object = None,
        capture_layers: int | Sequence[int] | None = None,
        include_patch_embed: bool = False,
        detach: bool = False,
    ) -> dict[str, torch.Tensor]:
        """{"block_i": tokens after block i for each captured i, "patch_embed": after the
        embedder and positions (when ``include_patch_embed``), "final": after the last block,
        before the final layer}, each (B, N, hidden). ``capture_layers``: an int, ints, or
        None (depth // 2); ValueError outside [0, depth), RuntimeError at depth 0."""
        del y
        self._check_full_interface("extract_transformer_hidden_features")
        depth = self.config.depth
        if depth == 0:
            raise RuntimeError(
                f"{self._model_name()} has no transformer (depth 0, the stage-1 local denoiser alone): "
                f"extract_transformer_hidden_features needs depth >= 1"
            )
        blocks = capture_indices(capture_layers, depth, self._model_name())
        features = self.hidden_features(input, batch_timesteps(t, input), blocks, include_patch_embed, final=True)
        return {k: v.detach() for k, v in features.items()} if detach else features

    def load_coarse_checkpoint(self, path: str | os.PathLike) -> list[str]:
        """Stage 2's start in the official trainer: the ``model`` weights of a stage-1 file (an
        official dict, ours, or a bare state dict; DDP ``module.`` / compile ``_orig_mod.``
        prefixes dropped) loaded non-strictly, then ``freeze_coarse_path()``. Returns the
        names loaded. ValueError when the file does not hold this model's whole coarse path;
        a name with another shape is torch's RuntimeError (as in the official code)."""
        ckpt = read_checkpoint(path)
        state = ckpt["model"] if isinstance(ckpt.get("model"), Mapping) else ckpt
        state = strip_wrapper_prefixes(state)
        coarse_ids = {id(p) for p in self.coarse_parameters()}
        coarse = [n for n, p in self.named_parameters() if id(p) in coarse_ids]
        absent = [n for n in coarse if n not in state]
        if absent:
            raise ValueError(
                f"{path} is not a stage-1 checkpoint of {self._model_name()}: its model weights lack "
                f"{len(absent)} of the coarse path's {len(coarse)} tensors, e.g. {absent[:3]}"
            )
        own = set(self.state_dict())
        self.load_state_dict(state, strict=False)
        self.freeze_coarse_path()
        return [name for name in state if name in own]
