"""The paper's W-Score (spec section 10): a WGAN-GP critic trained per pair of generators
(model X and a reference model) against one real set, then read out on held-out volumes:
W_i = mean D(real) - mean D(generator i), W-Score(X) = W_X / W_reference.

    from prdit_fast.metrics import wscore
    result = wscore(real, fake, reference, seeds=(42, 43, 44, 45, 46))
    result["ratio"], result["ratio_ci95"], result["ratio_seed_std"]

``WCritic`` is the authors' critic (its state dict has their names, with the parameters
``torch.nn.utils.spectral_norm`` creates: ``weight_orig``, ``weight_u``, ``weight_v``), so
their critic checkpoints load with ``strict=True``. ``wscore_transform`` is their
per-volume preprocessing. The defaults are their protocol (lambda 30, the 60/40 split of
the name-sorted files, 20 epochs, the in-sample checkpoint rule, Adam(5e-5, betas (0, 0.9),
coupled weight decay 1e-4), gradient clip 1.0, batches of 4 real + 4 fake, seed 42); the
better choices the spec names are options: ``checkpoint="held_out"``, several ``seeds``,
``split="shuffled"``.

Speed: both sets are preprocessed once and kept on the device in float16; every seed's
critic trains at once as one grouped-convolution network (seed s owns channel group s, so
one step updates all seeds, each exactly as alone: the losses are independent and Adam is
elementwise; the gradient clip is per seed); the w branch may run under bf16 autocast
while the gradient penalty runs in fp32.
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .distances import bias_corrected_interval

EDGE = 128  # the authors' critic sees 128^3 volumes; its last conv (kernel EDGE // 16) reduces 8^3 to 1
WIDTHS = (64, 128, 256, 256)
SLOPE = 0.2
NORM_EPS = 1e-5
SPECTRAL_EPS = 1e-12  # torch.nn.utils.spectral_norm's
INIT_STD = 0.02
PRECISIONS = ("fp32", "tf32", "bf16")
CHECKPOINT_RULES = ("in_sample", "held_out")
SPLITS = ("first", "shuffled")
GRAD_NORM_BAND = 0.2  # the kept epoch's mean |grad D(x_hat)| lies within this of 1


class WCritic(nn.Module):
    """The authors' W-Score critic (6,952,897 parameters at its 128^3 edge).

    forward: x (B, 1, E, E, E) in [-1, 1] -> (B,) one unbounded score per volume.
    ``main``: Conv3d(1->64, k4 s2 p1) -> LeakyReLU(0.2) -> three [Conv3d(k4 s2 p1) ->
    InstanceNorm3d(affine) -> LeakyReLU(0.2)] (64->128->256->256) -> Conv3d(256->1, k E/16),
    the first four convs under spectral norm. ``edge`` other than 128 shrinks only the
    last kernel, ``widths`` other than (64, 128, 256, 256) the channels (both for tests on
    small volumes; the W-Score is defined with the defaults)."""

    def __init__(self, edge: int = EDGE, widths: Sequence[int] = WIDTHS):
        super().__init__()
        if edge < 32 or edge % 16:  # the last InstanceNorm needs more than one voxel: edge / 16 >= 2
            raise ValueError(f"the critic's edge must be a multiple of 16 and >= 32, got {edge}")
        layers: list[nn.Module] = []
        channels = 1
        for index, width in enumerate(widths):
            conv = nn.Conv3d(channels, width, 4, stride=2, padding=1)
            _init(conv)
            layers.append(torch.nn.utils.spectral_norm(conv, eps=SPECTRAL_EPS))
            if index:
                layers.append(nn.InstanceNorm3d(width, affine=True, eps=NORM_EPS))
            layers.append(nn.LeakyReLU(SLOPE))
            channels = width
        last = nn.Conv3d(channels, 1, edge // 16)
        _init(last)
        layers.append(last)
        self.main = nn.Sequential(*layers)
        self.edge = edge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).flatten()


def _init(conv: nn.Conv3d) -> None:
    nn.init.normal_(conv.weight, 0.0, INIT_STD)
    nn.init.zeros_(conv.bias)


# (module index in WCritic.main, spectral norm, instance norm index or None) per conv
_CONVS = ((0, True, None), (2, True, 3), (5, True, 6), (8, True, 9), (11, False, None))


def new_critics(seeds: Sequence[int], edge: int = EDGE, device: str | torch.device = "cpu",
                widths: Sequence[int] = WIDTHS) -> dict[str, torch.Tensor]:
    """Every seed's freshly initialized critic (``WCritic`` built under ``torch.manual_seed(seed)``),
    stacked: {state-dict name: (S, ...)}."""
    states = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            states.append(WCritic(edge, widths).state_dict())
    return {k: torch.stack([s[k] for s in states]).to(device) for k in states[0]}


def critic_state(stacked: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Seed ``index``'s critic from stacked parameters, as ``WCritic.load_state_dict`` takes it."""
    return {k: v[index].detach().float().cpu().clone() for k, v in stacked.items()}


def _sigma(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, power_iteration: bool):
    """Spectral norm of each seed's weight (S, out, ...) as torch.nn.utils.spectral_norm computes
    it: in training, one power iteration (v then u, no gradient) first -> (sigma (S,), u, v)."""
    matrix = weight.flatten(2)
    if power_iteration:
        with torch.no_grad():
            v = F.normalize(torch.einsum("sor,so->sr", matrix, u), dim=1, eps=SPECTRAL_EPS)
            u = F.normalize(torch.einsum("sor,sr->so", matrix, v), dim=1, eps=SPECTRAL_EPS)
    return torch.einsum("so,sor,sr->s", u, matrix, v), u, v


def critic_forward(params: dict[str, torch.Tensor], x: torch.Tensor, training: bool = False) -> torch.Tensor:
    """All seeds' critics at once: x (B, S, E, E, E), seed s's input in channel s -> (B, S).

    ``training``: spectral norm's power iteration runs and updates ``params``' u and v in
    place (as the module's forward pre-hook does); eval mode uses them as they are."""
    seeds = x.shape[1]
    h = x
    for index, spectral, norm in _CONVS:
        name = f"main.{index}"
        if spectral:
            weight = params[f"{name}.weight_orig"]
            with torch.autocast(x.device.type, enabled=False):  # sigma in fp32 under a bf16 forward too
                sigma, u, v = _sigma(weight, params[f"{name}.weight_u"], params[f"{name}.weight_v"], training)
            if training:
                params[f"{name}.weight_u"].copy_(u)
                params[f"{name}.weight_v"].copy_(v)
            weight = weight / sigma.view(-1, *([1] * (weight.ndim - 1)))
        else:
            weight = params[f"{name}.weight"]
        stride, padding = (2, 1) if spectral else (1, 0)
        h = F.conv3d(h, weight.flatten(0, 1).to(h.dtype), params[f"{name}.bias"].flatten().to(h.dtype),
                     stride=stride, padding=padding, groups=seeds)
        if norm is not None:
            h = F.instance_norm(h, weight=params[f"main.{norm}.weight"].flatten(),
                                bias=params[f"main.{norm}.bias"].flatten(), eps=NORM_EPS)
        if spectral:
            h = F.leaky_relu(h, SLOPE)
    return h.flatten(1).float()


def wscore_transform(volume, edge: int = EDGE) -> torch.Tensor:
    """The authors' per-volume preprocessing -> (1, edge, edge, edge) float32 in [-1, 1].

    volume: (S, S, S) or (1, S, S, S), any edge, any float scale. Resized to ``edge`` by
    trilinear interpolation (align_corners=False: 2x average pooling from 2 x edge); if
    min >= -0.1 it is taken as [0, 1] data: clamp(0, 1) * 2 - 1, else clamp(-1, 1); then,
    if it spans more than 1e-6 but does not reach both -0.999 and 0.999, its min..max is
    stretched to [-1, 1]."""
    x = torch.as_tensor(volume).float()
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"a W-Score volume must be (S, S, S) or (1, S, S, S), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("a W-Score volume holds NaN or inf")
    if tuple(x.shape) != (edge,) * 3:
        x = F.interpolate(x[None, None], size=(edge,) * 3, mode="trilinear", align_corners=False)[0, 0]
    x = x.clamp(0, 1) * 2 - 1 if float(x.min()) >= -0.1 else x.clamp(-1, 1)
    low, high = float(x.min()), float(x.max())
    if high - low > 1e-6 and (low > -0.999 or high < 0.999):
        x = (x - low) / (high - low) * 2 - 1
    return x[None]


def resident_set(volumes: Iterable, edge: int, device: torch.device) -> torch.Tensor:
    """Volumes -> (N, edge, edge, edge) float16 on ``device``, each through ``wscore_transform``."""
    if isinstance(volumes, (torch.Tensor, np.ndarray)) and np.ndim(volumes) in (4, 5):
        volumes = list(volumes)
    out = [wscore_transform(v, edge)[0].to(device=device, dtype=torch.float16) for v in volumes]
    if not out:
        raise ValueError("a W-Score set is empty")
    return torch.stack(out)


def split_counts(n_real: int, n_fakes: Sequence[int], fraction: float = 0.6) -> tuple[int, list[int], list[int]]:
    """The authors' split: each generator cut to its first min(n_fake, n_real) volumes; the
    first int(fraction n) of every set train -> (real train count, each generator's kept
    count, each generator's train count)."""
    kept = [min(n, n_real) for n in n_fakes]
    return int(fraction * n_real), kept, [int(fraction * n) for n in kept]


def check_split(n_real: int, n_fakes: Sequence[int], batch: int = 4, fraction: float = 0.6):
    """``split_counts``, after checking that every set keeps a training and a held-out part
    and the real training part fills a batch; ValueError saying how many are needed."""
    n_real_train, kept, n_train = split_counts(n_real, n_fakes, fraction)
    if (n_real_train < batch or min(n_train) < 1 or min(k - t for k, t in zip(kept, n_train)) < 1
            or n_real == n_real_train):
        raise ValueError(f"too few volumes for the W-Score split: {n_real} real, {list(n_fakes)} generated; each set "
                         f"needs >= {math.ceil(batch / fraction) + 1} (a {fraction:.0%} training part that fills a "
                         f"batch of {batch}, and a held-out part)")
    return n_real_train, kept, n_train


class _Precision:
    """TF32 for convolutions per ``precision``, cuDNN determinism per ``deterministic``; restored on exit."""

    def __init__(self, precision: str, deterministic: bool):
        self.allow_tf32, self.deterministic = precision != "fp32", deterministic

    def __enter__(self):
        backend = torch.backends.cudnn
        self.saved = (backend.allow_tf32, backend.deterministic, backend.benchmark)
        backend.allow_tf32, backend.deterministic = self.allow_tf32, self.deterministic
        backend.benchmark = not self.deterministic
        return self

    def __exit__(self, *exc):
        backend = torch.backends.cudnn
        backend.allow_tf32, backend.deterministic, backend.benchmark = self.saved


def train_step(params, optimizer, real: torch.Tensor, fake: torch.Tensor, eta: torch.Tensor, lambda_gp: float,
               clip: float, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One critic step for every seed: real, fake (B, S, E, E, E) float32, eta (B, S) in [0, 1)
    -> (w (S,), mean |grad D(x_hat)| (S,)). loss_s = -w_s + lambda mean_b (|grad|_2 - 1)^2,
    each seed's gradient clipped to norm ``clip`` on its own, then one Adam step."""
    optimizer.zero_grad(set_to_none=True)
    batch = real.shape[0]
    with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=bf16):
        scores = critic_forward(params, torch.cat([real, fake]), training=True)
    w = scores[:batch].mean(0) - scores[batch:].mean(0)
    e = eta.view(*eta.shape, 1, 1, 1)
    x_hat = (e * real + (1 - e) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic_forward(params, x_hat, training=True).sum(), x_hat, create_graph=True)
    norms = grad.flatten(2).norm(dim=2)  # (B, S)
    penalty = lambda_gp * ((norms - 1) ** 2).mean(0)
    (penalty - w).sum().backward()
    trained = [p for p in params.values() if p.requires_grad]
    total = torch.sqrt(sum((p.grad.flatten(1) ** 2).sum(1) for p in trained))  # (S,)
    coefficient = (clip / (total + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s rule, per seed
    for p in trained:
        p.grad.mul_(coefficient.view(-1, *([1] * (p.ndim - 1))))
    optimizer.step()
    return w.detach(), norms.detach().mean(0)


@torch.no_grad()
def critic_scores(params, volumes: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Eval-mode scores of every seed's critic on volumes (N, E, E, E) -> (S, N) float32."""
    seeds = next(iter(params.values())).shape[0]
    out = [critic_forward(params, part[:, None].float().expand(-1, seeds, -1, -1, -1)) for part in volumes.split(chunk)]
    return torch.cat(out).T


def wscore(
    real,
    fake,
    reference,
    seeds: Sequence[int] = (42,),
    epochs: int = 20,
    lambda_gp: float = 30.0,
    lr: float = 5e-5,
    betas: tuple[float, float] = (0.0, 0.9),
    weight_decay: float = 1e-4,
    clip: float = 1.0,
    batch: int = 4,
    train_fraction: float = 0.6,
    split: str = "first",
    checkpoint: str = "in_sample",
    bootstrap: int = 1000,
    level: float = 0.95,
    edge: int = EDGE,
    widths: Sequence[int] = WIDTHS,
    device: str | torch.device | None = None,
    precision: str = "tf32",
    deterministic: bool = True,
    progress: bool = False,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """W-Score of ``fake`` against ``reference`` on ``real`` (spec section 10).

    real, fake, reference: volumes in name order (sequences of (S, S, S) or (1, S, S, S),
    or tensors (N, [1,] S, S, S)), any edge and scale ``wscore_transform`` accepts.
    seeds: one critic per seed, all trained at once; the result averages their ratios and
    gives their spread. split: "first" (the authors': the first 60% of each set train) or
    "shuffled" (a seeded permutation first). checkpoint: "in_sample" (the authors': the
    epoch with mean |grad D(x_hat)| within 0.2 of 1 and the best epoch-mean training w so
    far) or "held_out" (the same band, the best held-out W of both generators pooled); a
    seed whose epochs never meet the band keeps its last epoch (``rule_met`` False).
    precision: "fp32", "tf32" (TF32 convolutions) or "bf16" (the w branch under bf16
    autocast; the gradient penalty always in fp32). edge, widths: the critic's input edge
    and channels, the authors' (128, (64, 128, 256, 256)) by default; smaller ones only for
    tests. bootstrap: replicates over the
    held-out volumes (all seeds' critics read the same resample).

    Returns W per generator and seed, ``ratio`` (the mean over seeds of W_fake /
    W_reference), ``ratio_per_seed``, ``ratio_seed_std``, ``ratio_bias_corrected`` and
    ``ratio_ci95``, the kept epochs, per-epoch logs, the protocol and timings."""
    from prdit_fast.devices import resolve_device

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if checkpoint not in CHECKPOINT_RULES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_RULES}, got {checkpoint!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if lambda_gp is None:
        raise ValueError("lambda_gp must be given (the authors' script crashes without it; their value is 30)")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or epochs < 1 or batch < 1:
        raise ValueError(f"need distinct seeds, epochs >= 1 and batch >= 1, got {seeds}, {epochs}, {batch}")
    device = resolve_device(device)
    started = time.perf_counter()
    sets = [resident_set(v, edge, device) for v in (real, fake, reference)]
    seconds = {"preprocess": time.perf_counter() - started}
    if split == "shuffled":
        order = torch.Generator().manual_seed(seeds[0])
        sets = [s[torch.randperm(s.shape[0], generator=order).to(device)] for s in sets]
    n_real_train, kept, n_train = check_split(sets[0].shape[0], [s.shape[0] for s in sets[1:]], batch, train_fraction)
    real_set, gens = sets[0], [s[:k] for s, k in zip(sets[1:], kept)]
    steps = n_real_train // batch
    pool_per_gen = n_real_train // 2
    fakes_train = torch.cat([g[:t] for g, t in zip(gens, n_train)])
    offsets = [0, n_train[0]]
    held = [real_set[n_real_train:]] + [g[t:] for g, t in zip(gens, n_train)]

    params = new_critics(seeds, edge, device, widths)
    for name, p in params.items():
        if not name.endswith(("weight_u", "weight_v")):
            p.requires_grad_(True)
    trained = [p for n, p in params.items() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=lr, betas=tuple(float(b) for b in betas), weight_decay=weight_decay)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    best = {k: v.detach().clone() for k, v in params.items()}
    best_value = torch.full((len(seeds),), -math.inf, device=device)
    best_epoch = [-1] * len(seeds)
    log: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps, desc=f"W-Score critics ({len(seeds)} seeds)", unit="step", dynamic_ncols=True)
    started = time.perf_counter()
    with _Precision(precision, deterministic):
        for epoch in range(epochs):
            real_order = torch.stack([torch.randperm(n_real_train, generator=g, device=device) for g in generators], 1)
            pools = []
            for g in generators:  # each generator's randperm(n_train)[:n_real_train // 2], then shuffled together
                picks = torch.cat([torch.randperm(t, generator=g, device=device)[:pool_per_gen] + o
                                   for t, o in zip(n_train, offsets)])
                pools.append(picks[torch.randperm(picks.numel(), generator=g, device=device)])
            pool_len = min(p.numel() for p in pools)
            pool = torch.stack([p[:pool_len] for p in pools], 1)  # (pool, S)
            w_sum = torch.zeros(len(seeds), device=device)
            norm_sum = torch.zeros(len(seeds), device=device)
            for step in range(steps):
                r = real_set[real_order[step * batch:(step + 1) * batch]].float()  # (B, S, E, E, E)
                rows = torch.arange(step * batch, (step + 1) * batch, device=device) % pool_len
                f = fakes_train[pool[rows]].float()
                eta = torch.stack([torch.rand(batch, generator=g, device=device) for g in generators], 1)
                w, norms = train_step(params, optimizer, r, f, eta, lambda_gp, clip, precision == "bf16")
                w_sum += w
                norm_sum += norms
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, w=f"{float(w.mean()):.3f}")
            w_mean, norm_mean = w_sum / steps, norm_sum / steps
            entry = {"epoch": epoch + 1, "w_train": w_mean.tolist(), "grad_norm": norm_mean.tolist()}
            value = w_mean
            if checkpoint == "held_out":
                scores = [critic_scores(params, h) for h in held]
                value = scores[0].mean(1) - torch.cat(scores[1:], 1).mean(1)
                entry["w_held_out"] = value.tolist()
            log.append(entry)
            better = ((norm_mean - 1).abs() <= GRAD_NORM_BAND) & (value > best_value)
            best_value = torch.where(better, value, best_value)
            for k, v in params.items():
                best[k] = torch.where(better.view(-1, *([1] * (v.ndim - 1))), v.detach(), best[k])
            best_epoch = [epoch + 1 if b else e for b, e in zip(better.tolist(), best_epoch)]
    if bar is not None:
        bar.close()
    seconds["train"] = time.perf_counter() - started
    rule_met = [e > 0 for e in best_epoch]
    for k, v in params.items():  # a seed that never met the band keeps its last epoch
        best[k] = torch.where(torch.tensor(rule_met, device=device).view(-1, *([1] * (v.ndim - 1))), best[k], v.detach())
    started = time.perf_counter()
    with _Precision(precision, deterministic):
        scores = [critic_scores(best, h).double().cpu().numpy() for h in held]  # (S, n) each
    seconds["readout"] = time.perf_counter() - started
    result = _readout(scores, bootstrap, level, bootstrap_seed)
    result.update({
        "seeds": seeds, "kept_epoch": [e if e > 0 else epochs for e in best_epoch], "rule_met": rule_met,
        "n_real": int(real_set.shape[0]), "n_fake": kept[0], "n_reference": kept[1],
        "n_train": {"real": n_real_train, "fake": n_train[0], "reference": n_train[1]},
        "n_held_out": {"real": int(held[0].shape[0]), "fake": int(held[1].shape[0]), "reference": int(held[2].shape[0])},
        "protocol": {"lambda_gp": lambda_gp, "epochs": epochs, "steps_per_epoch": steps, "batch": f"{batch}+{batch}",
                     "lr": lr, "betas": list(betas), "weight_decay": weight_decay, "clip": clip,
                     "train_fraction": train_fraction, "split": split, "checkpoint": checkpoint, "edge": edge,
                     "widths": list(widths),
                     "precision": precision, "deterministic": deterministic},
        "epochs_log": log, "device": str(device), "seconds": {k: round(v, 3) for k, v in seconds.items()},
    })
    return result


def _readout(scores: list[np.ndarray], bootstrap: int, level: float, seed: int) -> dict[str, Any]:
    """Held-out critic scores [real, fake, reference], each (S, n) -> W per generator and seed,
    the ratio, its spread over seeds and its bootstrap interval over the held-out volumes."""
    real, fake, ref = scores

    def ratios(i, j, k) -> np.ndarray:
        w_real = real[:, i].mean(1)
        return (w_real - fake[:, j].mean(1)) / (w_real - ref[:, k].mean(1))

    w_fake, w_ref = real.mean(1) - fake.mean(1), real.mean(1) - ref.mean(1)
    per_seed = w_fake / w_ref
    out: dict[str, Any] = {
        "w_fake": float(w_fake.mean()), "w_reference": float(w_ref.mean()),
        "w_fake_per_seed": w_fake.tolist(), "w_reference_per_seed": w_ref.tolist(),
        "ratio": float(per_seed.mean()), "ratio_per_seed": per_seed.tolist(),
        "ratio_seed_std": float(per_seed.std(ddof=1)) if per_seed.size > 1 else None,
    }
    if bootstrap:
        rng = np.random.default_rng(seed)
        n = [s.shape[1] for s in scores]
        values = [float(ratios(*(rng.integers(0, m, m) for m in n)).mean()) for _ in range(bootstrap)]
        out["ratio_bias_corrected"], out["ratio_ci95"] = bias_corrected_interval(out["ratio"], values, level, floor=None)
        out["bootstrap_replicates"] = bootstrap
    return out
