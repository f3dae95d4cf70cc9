"""Analytic FLOP count of one PRDiT forward pass (spec section 11).

Counts what a FLOP counter counts on the reference network: 2 M N K per matrix
product (every Linear, and the two attention products Q K^T and A V). LayerNorms,
modulations, activations, softmax and the unfold are memory traffic and are not
counted. Reproduces the spec's table: B/12/0 at 128^3 161 GFLOP, B/12/4 680,
B/12/12 1556, B/12/4 at 64^3 62.5. A PRDiT-SR wrapper (spec section 8) costs its base at
S_lo plus its head, a depth-0 PRDiT at S_hi: SR-B/12/4 128 -> 256 680 + 1,290 GFLOP.
"""
from __future__ import annotations

from .models import MLP_RATIO, TIMESTEP_FEATURES, PRDiTConfig
from .sr import SRConfig


def flops_breakdown(cfg: PRDiTConfig | SRConfig) -> dict[str, float]:
    """FLOPs of one forward pass for ONE volume, by part:
    ``t_embedder``, ``local_denoiser``, ``patch_embedder``, ``blocks_gemm``,
    ``blocks_attention`` (all blocks together), ``final_layer``; for a PRDiT-SR wrapper
    the base's parts prefixed ``base.`` and the head's ``sr.t_embedder`` and
    ``sr.local_denoiser``."""
    if isinstance(cfg, SRConfig):
        head = flops_breakdown(cfg.head)
        return {
            **{f"base.{k}": v for k, v in flops_breakdown(cfg.base).items()},
            "sr.t_embedder": head["t_embedder"],
            "sr.local_denoiser": head["local_denoiser"],
        }
    n, d, h, o = cfg.num_tokens, cfg.token_dim, cfg.hidden, cfg.out_token_dim
    mlp = int(h * MLP_RATIO)

    def linear(rows: int, fan_in: int, fan_out: int) -> float:
        return 2.0 * rows * fan_in * fan_out

    parts = {
        "t_embedder": linear(1, TIMESTEP_FEATURES, h) + linear(1, h, d) + (linear(1, h, h) if cfg.depth else 0.0),
        # adaLN runs once per volume; the two SwiGLUs (3 D x D GEMMs each) and the output GEMM per token
        "local_denoiser": linear(1, d, 6 * d) + 2 * 3 * linear(n, d, d) + linear(n, d, o),
        "patch_embedder": 0.0,
        "blocks_gemm": 0.0,
        "blocks_attention": 0.0,
        "final_layer": 0.0,
    }
    if cfg.depth:
        parts["patch_embedder"] = linear(n, d, mlp) + linear(n, mlp, h) + linear(n, d, h)
        per_block = linear(1, h, 6 * h) + linear(n, h, 3 * h) + linear(n, h, h) + linear(n, h, mlp) + linear(n, mlp, h)
        parts["blocks_gemm"] = cfg.depth * per_block
        parts["blocks_attention"] = cfg.depth * 2 * 2.0 * n * n * h  # Q K^T and A V over all heads
        parts["final_layer"] = linear(1, h, 2 * h) + linear(n, h, o)
    return parts


def flops_per_step(cfg: PRDiTConfig | SRConfig) -> float:
    """FLOPs of one model evaluation (one sampler step) for one volume."""
    return sum(flops_breakdown(cfg).values())
