"""The paper's feature network: MedicalNet's 3D ResNet-50 (spec section 10), its weight
file, and batched feature extraction.

Geometry (MedicalNet's segmentation backbone, 1 input channel): conv1 7^3 stride 2
padding 3 without bias, BatchNorm, ReLU, max-pool 3^3 stride 2 padding 1; bottleneck
layers [3, 4, 6, 3] of widths 64/128/256/512 (x4 out); layer2 stride 2; layer3 stride 1
with dilation 2; layer4 stride 1 with dilation 4 (a bottleneck's 3^3 conv pads by its
dilation); shortcut "B" (1^3 conv + BatchNorm where the shape changes); a global
average pool gives 2048 features. A generic 3D ResNet without the dilations computes
different features, so the weights only mean something in this network.

MedicalNet's ``resnet_50.pth`` is ``{"state_dict": {"module.conv1.weight": ...,
..., "module.conv_seg....": ...}}``: DataParallel's ``module.`` prefix and a
segmentation head ``conv_seg`` that is not part of the feature network.
``load_medicalnet`` strips the prefix, drops the head and then requires every backbone
tensor: the official evaluation's ``strict=False`` load of the prefixed keys matches
nothing and silently keeps the random initialization, which this loader refuses.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURES = 2048
LAYERS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
# (stride, dilation) of layer1..layer4
STRIDES_DILATIONS = ((1, 1), (2, 1), (1, 2), (1, 4))
HEAD_PREFIX = "conv_seg."
_WRAPPER_PREFIX = "module."
# BatchNorm's step counter is bookkeeping for training (MedicalNet's file may predate it)
_OPTIONAL_SUFFIX = ".num_batches_tracked"
_LISTED = 5
# MedicalNet on the Hugging Face Hub, the repository MONAI's resnet50(pretrained=True) reads
# (monai.networks.nets.resnet.get_pretrained_resnet_medicalnet); the paper's file is
# resnet_50.pth (not the _23dataset variant MONAI prefers). The digest is the Hub's LFS
# SHA-256 of that file at this revision.
HUB_REPO = "TencentMedicalNet/MedicalNet-Resnet50"
HUB_FILENAME = "resnet_50.pth"
HUB_REVISION = "8d924de10880fc392b71cbf61804e880aeb74e53"
HUB_SHA256 = "5b6189cafbee2f5604a7279b62bc163365aa6a86a377e1dc260a14275cacbd84"


class MedicalNetError(ValueError):
    """A weight file that is not MedicalNet's 3D ResNet-50."""


class Bottleneck(nn.Module):
    """1^3 conv -> 3^3 conv (stride, dilation) -> 1^3 conv (x4 channels), each followed by
    BatchNorm, ReLU after each but the last; the shortcut is added before the last ReLU."""

    def __init__(self, in_channels: int, width: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, width * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(width * EXPANSION)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + shortcut)


class MedicalNetResNet50(nn.Module):
    """MedicalNet's 3D ResNet-50 backbone with a global average pool.

    forward: x (B, 1, D, H, W) -> features (B, 2048). Parameter names are MedicalNet's
    (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ...)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        in_channels = 64
        for index, (blocks, width, (stride, dilation)) in enumerate(zip(LAYERS, WIDTHS, STRIDES_DILATIONS), 1):
            out_channels = width * EXPANSION
            downsample = None
            if stride != 1 or in_channels != out_channels:  # shortcut "B"
                downsample = nn.Sequential(
                    nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm3d(out_channels)
                )
            layer = [Bottleneck(in_channels, width, stride, dilation, downsample)]
            layer += [Bottleneck(out_channels, width, 1, dilation) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
            in_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool3d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3, 4))


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - _LISTED} more)" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def backbone_state(state: Mapping[str, torch.Tensor], source: str = "the weights") -> dict[str, torch.Tensor]:
    """MedicalNet's state dict -> the backbone's: ``module.`` stripped, ``conv_seg.*`` dropped,
    every backbone tensor present with its shape (a missing BatchNorm step counter becomes 0).
    Raises MedicalNetError naming the missing, unexpected or misshapen keys."""
    stripped = {(k[len(_WRAPPER_PREFIX):] if k.startswith(_WRAPPER_PREFIX) else k): v for k, v in state.items()}
    stripped = {k: v for k, v in stripped.items() if not k.startswith(HEAD_PREFIX)}
    with torch.device("meta"):  # names and shapes only, no initialization
        expected = MedicalNetResNet50().state_dict()
    missing = sorted(k for k in expected if k not in stripped and not k.endswith(_OPTIONAL_SUFFIX))
    unexpected = sorted(k for k in stripped if k not in expected)
    misshapen = sorted(
        f"{k} {tuple(stripped[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items() if k in stripped and stripped[k].shape != v.shape
    )
    if missing or unexpected or misshapen:
        problems = []
        if missing:
            problems.append(f"{len(missing)} backbone tensors missing: {_listed(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensors: {_listed(unexpected)}")
        if misshapen:
            problems.append(f"{len(misshapen)} of another shape: {_listed(misshapen)}")
        raise MedicalNetError(
            f"{source} are not MedicalNet's 3D ResNet-50 ({'; '.join(problems)}); use resnet_50.pth from "
            f"the MedicalNet release (Tencent/MedicalNet, pretrain/resnet_50.pth)"
        )
    for key in expected:
        if key.endswith(_OPTIONAL_SUFFIX) and key not in stripped:
            stripped[key] = torch.zeros((), dtype=torch.long)
    return stripped


def load_medicalnet(
    weights: str | os.PathLike | Mapping[str, torch.Tensor], map_location: str | torch.device = "cpu"
) -> MedicalNetResNet50:
    """The feature network with MedicalNet's weights, in eval mode.

    ``weights``: the path of ``resnet_50.pth`` (a dict with ``state_dict``, or a bare state
    dict; read with ``weights_only=True``), or a state dict. The backbone is loaded
    strictly; the segmentation head and the ``module.`` prefix are accepted."""
    source = "the given state dict"
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"MedicalNet weights {path} do not exist; download resnet_50.pth from the "
                                    f"MedicalNet release (see the README, section Evaluation)")
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # a truncated download, an HTML page saved as .pth, ...
            raise MedicalNetError(f"{path} is not a readable torch file ({type(e).__name__}: {e})") from e
        weights = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise MedicalNetError(f"{source} holds no state dict of tensors (expected {{'state_dict': {{name: tensor}}}})")
    state = backbone_state(weights, source)
    broken = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if broken:
        raise MedicalNetError(f"{source}: {len(broken)} tensors hold NaN or inf ({_listed(broken)}); the file is "
                              f"corrupt: download resnet_50.pth again")
    with torch.device("meta"):
        net = MedicalNetResNet50()
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    return net.to(map_location).eval().requires_grad_(False)


def random_medicalnet(seed: int = 0) -> MedicalNetResNet50:
    """The feature network with seeded random weights (PyTorch's default initialization) in
    eval mode: lets ``evaluate`` run without MedicalNet's file; its numbers compare with
    nothing published."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MedicalNetResNet50()
    return net.eval().requires_grad_(False)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def fetch_medicalnet_weights(cache_dir: str | os.PathLike | None = None, offline: bool | None = None) -> Path:
    """MedicalNet's ``resnet_50.pth`` from the Hugging Face Hub repository MONAI downloads
    MedicalNet weights from (``HUB_REPO`` at the pinned ``HUB_REVISION``), cached by
    ``huggingface_hub`` (``cache_dir``, default $HF_HUB_CACHE or ~/.cache/huggingface/hub),
    and checked against the SHA-256 the Hub publishes for that file (``HUB_SHA256``).

    ``offline`` (default: $HF_HUB_OFFLINE) reads only the cache. Raises MedicalNetError
    naming the file to place by hand, and where, when it is not cached and cannot be
    downloaded, or when the cached file's digest differs."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = cache_dir if cache_dir is not None else os.environ.get("HF_HUB_CACHE")
    offline = _truthy(os.environ.get("HF_HUB_OFFLINE")) if offline is None else offline
    try:
        path = Path(hf_hub_download(HUB_REPO, HUB_FILENAME, revision=HUB_REVISION, cache_dir=cache_dir,
                                    local_files_only=offline))
    except (LocalEntryNotFoundError, OSError) as e:
        from huggingface_hub.constants import HF_HUB_CACHE

        root = Path(cache_dir) if cache_dir is not None else Path(HF_HUB_CACHE)
        place = root / f"models--{HUB_REPO.replace('/', '--')}" / "snapshots" / HUB_REVISION / HUB_FILENAME
        why = "offline (HF_HUB_OFFLINE)" if offline else f"the download failed ({type(e).__name__})"
        raise MedicalNetError(
            f"MedicalNet's {HUB_FILENAME} is not cached and {why}: download it from "
            f"https://huggingface.co/{HUB_REPO} and pass --weights PATH, or place it at {place}"
        ) from e
    from ..sample_runs import file_sha256

    digest = file_sha256(path)
    if digest != HUB_SHA256:
        raise MedicalNetError(f"{path} has SHA-256 {digest}, not the published {HUB_SHA256} of {HUB_REPO}/"
                              f"{HUB_FILENAME}: delete it and run again to download it afresh")
    return path


def network_digest(net: nn.Module) -> str:
    """SHA-256 of the network's tensors (names, shapes and values, in name order): the same
    weights give the same digest whatever file or container held them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        if name.endswith(_OPTIONAL_SUFFIX):
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def iter_batches(volumes, batch_size: int) -> Iterator[torch.Tensor]:
    """(N, 1, S, S, S) tensors/arrays, or an iterable of such batches (or of single
    (1, S, S, S) volumes) -> float32 CPU/device tensors of at most ``batch_size`` volumes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(volumes, (torch.Tensor, np.ndarray)):
        volumes = [volumes]
    for item in volumes:
        batch = torch.as_tensor(item)
        if batch.ndim == 4:
            batch = batch[None]
        if batch.ndim != 5 or batch.shape[1] != 1 or len(set(batch.shape[2:])) != 1:
            raise ValueError(f"volumes must be (N, 1, S, S, S) cubes (or (1, S, S, S) each), got {tuple(batch.shape)}")
        for start in range(0, batch.shape[0], batch_size):
            yield batch[start:start + batch_size]


@dataclass
class FeatureSet:
    """A set's MedicalNet features (N, 2048) float64, its value range and volume edge."""

    features: np.ndarray
    low: float
    high: float
    size: int

    @property
    def count(self) -> int:
        return int(self.features.shape[0])


def scan(
    volumes,
    net: MedicalNetResNet50,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    keep: bool = False,
    progress: bool = False,
    desc: str = "features",
) -> tuple[FeatureSet, torch.Tensor | None]:
    """One pass over ``volumes``: features, value range and edge; with ``keep`` the volumes
    themselves too (N, 1, S, S, S) float32 on the CPU, for MS-SSIM."""
    device = torch.device(device)
    batches = iter_batches(volumes, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True)
    feats, kept, low, high, size = [], [], np.inf, -np.inf, None
    with torch.no_grad():
        for batch in batches:
            x = batch.to(device=device, dtype=torch.float32)
            if size is None:
                size = int(x.shape[-1])
            elif x.shape[-1] != size:
                raise ValueError(f"a set mixes volume edges {size} and {x.shape[-1]}")
            if not torch.isfinite(x).all():
                raise ValueError("a volume contains NaN or inf")
            low, high = min(low, float(x.min())), max(high, float(x.max()))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                feats.append(net(x).double().cpu().numpy())
            if keep:
                kept.append(x.cpu())
    if size is None:
        raise ValueError("the set is empty")
    return FeatureSet(np.concatenate(feats), low, high, size), (torch.cat(kept) if keep else None)


def features(
    volumes,
    weights: str | os.PathLike | MedicalNetResNet50,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> np.ndarray:
    """MedicalNet features of ``volumes`` ((N, 1, S, S, S) in [-1, 1], or an iterable of
    such batches) -> float64 array (N, 2048).

    ``weights``: the path of ``resnet_50.pth`` or a loaded ``MedicalNetResNet50``.
    ``dtype``: torch.float32 (the reference) or torch.bfloat16 (autocast: bf16 convolutions,
    fp32 BatchNorm statistics and pooling)."""
    from prdit_fast.devices import resolve_device

    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    device = resolve_device(device)
    net = weights if isinstance(weights, MedicalNetResNet50) else load_medicalnet(weights)
    return scan(volumes, net.to(device).eval(), batch_size, device, dtype, progress=progress)[0].features
