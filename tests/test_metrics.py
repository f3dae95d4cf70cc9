"""prdit_fast.metrics: MedicalNet feature network and loader, FID, MMD, MS-SSIM, evaluate()."""
import itertools
import statistics

import numpy as np
import pytest
import torch

from prdit_fast.metrics import (
    IntensityRangeError,
    MedicalNetError,
    MedicalNetResNet50,
    evaluate,
    features,
    fid,
    frechet_distance,
    load_medicalnet,
    mmd,
    ms_ssim_diversity,
    ms_ssim_pairs,
)
from prdit_fast.metrics.distances import bootstrap_intervals, fid_via_factors
from prdit_fast.metrics.ms_ssim import all_pairs


def medicalnet_file(path, net: torch.nn.Module) -> None:
    """Save ``net`` as MedicalNet's resnet_50.pth is laid out: DataParallel prefixes and a
    segmentation head."""
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(32, 2048, 3, 3, 3)
    state["module.conv_seg.1.weight"] = torch.ones(32)
    torch.save({"state_dict": state}, path)


@pytest.fixture(scope="module")
def net() -> MedicalNetResNet50:
    torch.manual_seed(1)
    return MedicalNetResNet50().eval()


@pytest.mark.parametrize("size, grid", [(32, 4), (64, 8)])
def test_feature_network_shapes_and_geometry(net, size, grid):
    seen = {}

    def record(module, inputs, output):
        seen["layer4"] = output.shape

    hook = net.layer4.register_forward_hook(record)
    with torch.no_grad():
        out = net(torch.rand(1, 1, size, size, size) * 2 - 1)
    hook.remove()
    assert out.shape == (1, 2048)
    # conv1 and the max-pool halve twice, layer2 once; layers 3 and 4 keep the grid (dilated)
    assert seen["layer4"] == (1, 2048, grid, grid, grid)
    assert [net.layer3[0].conv2.dilation, net.layer4[0].conv2.dilation] == [(2, 2, 2), (4, 4, 4)]
    assert net.layer4[1].conv2.padding == (4, 4, 4) and net.layer2[0].conv2.stride == (2, 2, 2)
    assert net.conv1.bias is None and net.conv1.kernel_size == (7, 7, 7)
    assert sum(p.numel() for p in net.parameters()) == 46_155_072


def test_loader_reads_medicalnet_layout(tmp_path, net):
    medicalnet_file(tmp_path / "resnet_50.pth", net)
    loaded = load_medicalnet(tmp_path / "resnet_50.pth")
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = net(x).double().numpy()
    # batch 1 and 2 may take different convolution algorithms: fp32 rounding apart
    np.testing.assert_allclose(features(x, loaded, batch_size=1), expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(features(x, str(tmp_path / "resnet_50.pth"), batch_size=2), expected, rtol=1e-5, atol=1e-8)


def test_bf16_features_stay_within_two_percent_of_fp32(net):
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    reference = features(x, net, batch_size=2)
    low = features(x, net, batch_size=2, dtype=torch.bfloat16)
    assert np.linalg.norm(low - reference) / np.linalg.norm(reference) < 2e-2  # bf16 autocast, fp32 accumulation


def test_loader_names_missing_unexpected_and_misshapen_keys(tmp_path, net):
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    del state["module.layer3.2.bn2.running_var"]
    state["module.fc.weight"] = torch.zeros(2, 2048)
    state["module.layer1.0.conv1.weight"] = torch.zeros(64, 64, 3, 3, 3)
    torch.save({"state_dict": state}, tmp_path / "wrong.pth")
    with pytest.raises(MedicalNetError) as err:
        load_medicalnet(tmp_path / "wrong.pth")
    message = str(err.value)
    assert "layer3.2.bn2.running_var" in message and "fc.weight" in message
    assert "layer1.0.conv1.weight (64, 64, 3, 3, 3)" in message and "MedicalNet" in message


def test_loader_refuses_other_files(tmp_path):
    from prdit_fast import create_model, save_checkpoint

    torch.save(create_model("PRDiT-XS/10/0", 16).state_dict(), tmp_path / "prdit_state.pt")
    with pytest.raises(MedicalNetError, match="265 backbone tensors missing: bn1.bias"):
        load_medicalnet(tmp_path / "prdit_state.pt")
    save_checkpoint(tmp_path / "prdit.pt", create_model("PRDiT-XS/10/0", 16))
    with pytest.raises(MedicalNetError, match="holds no state dict"):
        load_medicalnet(tmp_path / "prdit.pt")
    (tmp_path / "page.pth").write_text("<html>not found</html>")
    with pytest.raises(MedicalNetError, match="not a readable torch file"):
        load_medicalnet(tmp_path / "page.pth")
    with pytest.raises(FileNotFoundError, match="resnet_50.pth"):
        load_medicalnet(tmp_path / "absent.pth")


def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(40, 6))
    assert abs(fid(feats, feats)) < 1e-9


def test_frechet_distance_equals_the_closed_form_of_commuting_gaussians():
    rng = np.random.default_rng(1)
    d = 5
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T  # same eigenvectors: sqrt(S1 S2) = Q sqrt(ab) Q^T
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(closed, rel=1e-10)


def test_fid_of_gaussian_samples_equals_the_closed_form_of_their_fits():
    rng = np.random.default_rng(2)
    real = rng.normal(0.0, 1.0, size=(300, 3))
    fake = rng.normal(0.5, 2.0, size=(300, 3))
    # 1-D per axis is exact only for diagonal fits: compare with the plain formula on the fits
    mu1, mu2, s1, s2 = real.mean(0), fake.mean(0), np.cov(real.T), np.cov(fake.T)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    w2, v2 = np.linalg.eigh(root1 @ s2 @ root1)
    closed = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.sum(np.sqrt(w2))
    assert fid(real, fake) == pytest.approx(closed, rel=1e-9)


@pytest.mark.parametrize("n, d", [(50, 8), (12, 40)])  # more and fewer volumes than features
def test_fid_via_factors_equals_the_sqrtm_form(n, d):
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(n, d)), rng.normal(0.3, 1.5, size=(n + 3, d))
    assert fid_via_factors(torch.as_tensor(real), torch.as_tensor(fake)) == pytest.approx(fid(real, fake), rel=1e-6)


def test_mmd_equals_a_direct_double_loop():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 5)), rng.normal(0.4, 1.2, size=(6, 5))
    sq = lambda u, v: float(np.sum((u - v) ** 2))  # noqa: E731
    gamma = 1 / (2 * statistics.median(sq(a, b) for a, b in itertools.product(x, x)))
    k = lambda u, v: np.exp(-gamma * sq(u, v))  # noqa: E731
    mmd2 = (np.mean([k(a, b) for a, b in itertools.product(x, x)]) + np.mean([k(a, b) for a, b in itertools.product(y, y)])
            - 2 * np.mean([k(a, b) for a, b in itertools.product(x, y)]))
    value, value2 = mmd(x, y)
    assert value2 == pytest.approx(mmd2, rel=1e-10) and value == pytest.approx(np.sqrt(mmd2), rel=1e-10)


def test_mmd_bandwidth_takes_torch_medians_lower_middle_value_for_an_even_count():
    from prdit_fast.metrics.distances import rbf_gamma, squared_distances

    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(4, 3)), rng.normal(0.5, 1.0, size=(5, 3))
    sq = squared_distances(x, x)  # 16 entries: an even count, the two middle values differ
    middle = np.sort(sq.ravel())[7:9]
    assert middle[0] < middle[1]
    official = float(torch.median(torch.as_tensor(sq).flatten()))  # the official code's median
    assert official == middle[0] and rbf_gamma(sq) == 1 / (2 * official)
    assert rbf_gamma(sq) != 1 / (2 * float(np.median(sq)))
    gamma = 1 / (2 * official)
    k = lambda u, v: np.exp(-gamma * np.sum((u - v) ** 2))  # noqa: E731
    mmd2 = (np.mean([k(a, b) for a, b in itertools.product(x, x)]) + np.mean([k(a, b) for a, b in itertools.product(y, y)])
            - 2 * np.mean([k(a, b) for a, b in itertools.product(x, y)]))
    assert mmd(x, y)[1] == pytest.approx(mmd2, rel=1e-10)


def test_bootstrap_intervals_bracket_the_estimates():
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(80, 4)), rng.normal(0.5, 1.0, size=(70, 4))
    ci = bootstrap_intervals(real, fake, replicates=50, seed=0)
    assert ci["fid"][0] <= fid(real, fake) <= ci["fid"][1]
    assert ci["mmd"][0] <= mmd(real, fake)[0] <= ci["mmd"][1]
    assert ci == bootstrap_intervals(real, fake, replicates=50, seed=0)  # seeded


def test_bootstrap_interval_brackets_the_bias_corrected_estimate_when_every_resample_is_biased_up():
    from prdit_fast.metrics.distances import bias_corrected_interval, small_sample_warning

    rng = np.random.default_rng(6)  # few volumes, wide features: resamples' repeated rows inflate MMD
    real, fake = rng.normal(size=(6, 64)), rng.normal(size=(6, 64))
    ci = bootstrap_intervals(real, fake, replicates=64, seed=0)
    estimate = mmd(real, fake)[0]
    assert ci["mmd_bias_corrected"] < estimate  # the plug-in is biased up; the correction moves down
    assert ci["mmd"][0] <= ci["mmd_bias_corrected"] <= ci["mmd"][1]
    assert ci["fid"][0] <= ci["fid_bias_corrected"] <= ci["fid"][1]
    # the definition: b = median(t*) - t, corrected t - b, basic interval [2t - q_hi, 2t - q_lo], floor 0
    corrected, interval = bias_corrected_interval(1.0, [1.5, 1.6, 1.7, 1.8, 1.9], level=0.5, floor=None)
    assert corrected == pytest.approx(0.3) and interval == pytest.approx([0.2, 0.4])
    assert bias_corrected_interval(1.0, [2.5, 2.6, 2.7], level=0.5) == (0.0, [0.0, 0.0])
    assert "only 6 volumes for 2048-d" in small_sample_warning(6, 10, 2048)
    assert small_sample_warning(3000, 2049, 2048) is None


def _volumes(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 1, size, size, size, generator=g)
    noise = torch.rand(n, 1, size, size, size, generator=g)
    mix = torch.linspace(0.1, 0.9, n)[:, None, None, None, None]  # pairs from similar to unrelated
    return (mix * base + (1 - mix) * noise) * 2 - 1


@pytest.mark.parametrize("impl", ["torch", "triton"])  # triton: the fused cross term under the interpreter
def test_ms_ssim_equals_monai_pair_by_pair(impl):
    monai = pytest.importorskip("monai.metrics")
    if impl == "triton":
        pytest.importorskip("triton")
    volumes = _volumes(3, 48)
    metric = monai.MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=3, reduction="none")
    pairs = [(0, 1), (0, 2), (1, 2), (2, 0)]  # (2, 0): the index is symmetric, ours evaluates each pair once
    reference = torch.stack([metric(volumes[i:i + 1], volumes[j:j + 1]).flatten()[0] for i, j in pairs])
    ours = ms_ssim_pairs(volumes, torch.as_tensor(pairs), pairs_per_call=3, impl=impl)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    if impl == "triton":
        return
    torch.testing.assert_close(reference[3], reference[1], rtol=1e-6, atol=1e-7)
    # the diversity's pair bookkeeping on the torch cross term ("auto" would pick the Triton
    # kernel under the interpreter, which the triton case above already checks pair by pair)
    mean, count = ms_ssim_diversity(volumes, pairs_per_call=2, impl=impl)
    assert count == 3 and mean == pytest.approx(float(reference[:3].double().mean()), rel=1e-5)
    subset, count = ms_ssim_diversity(volumes, max_pairs=2, seed=1, impl=impl)
    assert count == 2 and min(reference) - 1e-6 <= subset <= max(reference) + 1e-6


def test_ms_ssim_refuses_volumes_below_monais_minimum():
    with pytest.raises(ValueError, match="at least 48"):
        ms_ssim_pairs(torch.zeros(2, 1, 32, 32, 32), all_pairs(2))


def test_evaluate_checks_intensity_ranges(net):
    real = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    with pytest.raises(IntensityRangeError, match="differ by more than 0.1"):
        evaluate(real, real * 0.5, net, ms_ssim=False, bootstrap=0, fid_method="factors")
    with pytest.raises(IntensityRangeError, match="hu_to_unit"):
        evaluate(real, real * 1000, net, ms_ssim=False, bootstrap=0, fid_method="factors")


def test_evaluate_reports_and_caches_the_real_side(tmp_path, net):
    real, fake = _volumes(3, 16, seed=1), _volumes(3, 16, seed=2)
    batches = [fake[:2], fake[2:]]  # an iterable of batches
    first = evaluate(real, batches, net, batch_size=2, ms_ssim=True, bootstrap=10, cache_dir=tmp_path,
                     fid_method="factors")
    again = evaluate(real, batches, net, batch_size=2, ms_ssim=False, bootstrap=10, cache_dir=tmp_path,
                     fid_method="factors")
    assert (first["real_cache"], again["real_cache"]) == ("miss", "hit")
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-12) and again["mmd"] == first["mmd"]
    assert first["n_real"] == 3 and first["n_fake"] == 3 and first["size"] == 16
    assert first["fid_x1e3"] == pytest.approx(first["fid"] * 1e3) and first["mmd"] ** 2 == pytest.approx(first["mmd2"])
    assert first["ms_ssim"] is None and "48" in first["ms_ssim_note"]
    assert len(first["weights_sha256"]) == 64 and first["fid_ci95"][0] <= first["fid_ci95"][1]
    assert len(list(tmp_path.glob("real-*.npz"))) == 1


def test_training_logs_fid_and_mmd_of_ema_samples(tmp_path, net):
    import json

    from prdit_fast.training import ConfigError, resolve_config, train

    medicalnet_file(tmp_path / "resnet_50.pth", net)
    config = {
        "data": {"image_size": 16, "num_workers": 0, "phantom_length": 3},
        "model": {"name": "PRDiT-XS/10/0"},
        "training": {"batch_size": 2, "learning_rate": 1e-3, "total_steps": 2, "log_every": 1, "seed": 0,
                     "device": "cpu"},
        "output": {"results_dir": str(tmp_path / "run")},
        "metrics": {"weights": str(tmp_path / "resnet_50.pth"), "every": 2, "samples": 2, "sample_steps": 2,
                    "batch_size": 2, "cache_dir": str(tmp_path / "cache")},
    }
    train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval_fid" in r]
    assert [r["step"] for r in evaluations] == [2]
    record = evaluations[0]
    assert record["eval_samples"] == 2 and record["eval_real"] == 3 and np.isfinite(record["eval_fid"])
    assert record["eval_fid_x1e3"] == pytest.approx(record["eval_fid"] * 1e3) and record["eval_mmd"] >= 0
    assert len(list((tmp_path / "cache").glob("real-*.npz"))) == 1  # the real side, for the next run
    with pytest.raises(ConfigError, match="metrics.every"):
        resolve_config({**config, "metrics": {"weights": "w.pth"}})


def test_phantom_quality_sees_token_seams_and_histogram_shifts():
    from prdit_fast.metrics.phantom_quality import histogram_distance, phantom_quality, seam_ratios
    from prdit_fast.phantom import PhantomDataset, unit_to_hu

    phantoms = np.stack([unit_to_hu(v[0]).numpy() for v in PhantomDataset(32, 3, seed=0)])
    own = seam_ratios(phantoms)  # near 1 (edges of the body outline may sit on a boundary in a small set)
    assert np.all((own > 0.5) & (own < 3))
    blocks = phantoms.reshape(3, 4, 8, 4, 8, 4, 8).mean(axis=(2, 4, 6), keepdims=True)
    blocky = np.broadcast_to(blocks, (3, 4, 8, 4, 8, 4, 8)).reshape(3, 32, 32, 32) + phantoms * 0.01
    assert np.all(seam_ratios(blocky) > 10 * own)  # steps almost only across the 8-voxel boundaries
    assert histogram_distance(phantoms, phantoms + 100) == pytest.approx(100, abs=15)
    quality = phantom_quality(blocky, phantoms)
    assert quality["seam_ratio_vs_phantom"]["width"] > 10 and 0 < quality["volume_fractions"]["body"] < 1


def _hub_snapshot(cache, content: bytes):
    """Lay a file out as huggingface_hub caches it: models--owner--name/snapshots/<revision>/file."""
    from prdit_fast.metrics import medicalnet

    folder = cache / f"models--{medicalnet.HUB_REPO.replace('/', '--')}" / "snapshots" / medicalnet.HUB_REVISION
    folder.mkdir(parents=True)
    (folder / medicalnet.HUB_FILENAME).write_bytes(content)
    return folder / medicalnet.HUB_FILENAME


def test_medicalnet_weights_come_from_a_prepopulated_hub_cache_offline(tmp_path, monkeypatch):
    import hashlib

    from prdit_fast.metrics import medicalnet

    assert (medicalnet.HUB_REPO, medicalnet.HUB_FILENAME) == ("TencentMedicalNet/MedicalNet-Resnet50", "resnet_50.pth")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MedicalNetError, match="not cached and offline .*place it at .*snapshots") as missing:
        medicalnet.fetch_medicalnet_weights()
    assert str(tmp_path / "hub") in str(missing.value)
    content = b"stand-in for resnet_50.pth"
    placed = _hub_snapshot(tmp_path / "hub", content)
    with pytest.raises(MedicalNetError, match="has SHA-256 .* not the published 5b6189ca"):
        medicalnet.fetch_medicalnet_weights()  # the stand-in is not the published file
    monkeypatch.setattr(medicalnet, "HUB_SHA256", hashlib.sha256(content).hexdigest())
    assert medicalnet.fetch_medicalnet_weights().resolve() == placed.resolve()
