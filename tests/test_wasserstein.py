"""prdit_fast.metrics W-Score (spec section 10): the authors' critic, their preprocessing, the
concurrent-seed trainer against a per-seed module reference, and wscore end to end on tiny sets."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prdit_fast.metrics import WCritic, wscore, wscore_transform
from prdit_fast.metrics.wasserstein import critic_forward, critic_state, new_critics, split_counts, train_step

SMALL = (4, 8, 8, 8)  # the spec's layers with fewer channels: the same code paths at CPU test cost


def spec_critic(edge: int, widths=(64, 128, 256, 256)) -> nn.Sequential:
    """Section 10's critic written out independently: four spectral-norm convs k4 s2 p1
    (1->64->128->256->256), InstanceNorm3d(affine) after the last three, LeakyReLU(0.2), and a
    plain last conv 256->1 of kernel edge / 16."""
    sn, (a, b, c, d) = torch.nn.utils.spectral_norm, widths
    return nn.Sequential(
        sn(nn.Conv3d(1, a, 4, 2, 1)), nn.LeakyReLU(0.2),
        sn(nn.Conv3d(a, b, 4, 2, 1)), nn.InstanceNorm3d(b, affine=True), nn.LeakyReLU(0.2),
        sn(nn.Conv3d(b, c, 4, 2, 1)), nn.InstanceNorm3d(c, affine=True), nn.LeakyReLU(0.2),
        sn(nn.Conv3d(c, d, 4, 2, 1)), nn.InstanceNorm3d(d, affine=True), nn.LeakyReLU(0.2),
        nn.Conv3d(d, 1, edge // 16),
    )


def test_critic_has_the_spec_architecture_and_parameter_count():
    torch.manual_seed(0)
    critic = WCritic()
    assert sum(p.numel() for p in critic.parameters()) == 6_952_897
    convs = [m for m in critic.modules() if isinstance(m, nn.Conv3d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 64), (64, 128), (128, 256), (256, 256), (256, 1)]
    assert all(c.kernel_size == (4,) * 3 and c.stride == (2,) * 3 and c.padding == (1,) * 3 for c in convs[:4])
    assert convs[4].kernel_size == (8,) * 3 and convs[4].padding == (0,) * 3 and all(c.bias is not None for c in convs)
    assert [hasattr(c, "weight_orig") for c in convs] == [True] * 4 + [False]
    norms = [m for m in critic.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert len(norms) == 3 and all(n.affine and not n.track_running_stats and n.eps == 1e-5 for n in norms)
    assert all(m.negative_slope == 0.2 for m in critic.modules() if isinstance(m, nn.LeakyReLU))
    weights = torch.cat([c.weight_orig.flatten() for c in convs[:4]] + [convs[4].weight.flatten()])
    assert weights.std().item() == pytest.approx(0.02, rel=0.02) and all(c.bias.abs().max() == 0 for c in convs)
    spec = spec_critic(128)
    assert {k: v.shape for k, v in spec.state_dict().items()} == {
        k[len("main."):]: v.shape for k, v in critic.state_dict().items()}


def test_spec_critic_checkpoints_load_strictly_and_score_alike():
    torch.manual_seed(1)
    spec = spec_critic(32)
    critic = WCritic(edge=32)
    critic.load_state_dict({f"main.{k}": v for k, v in spec.state_dict().items()}, strict=True)
    x = torch.rand(2, 1, 32, 32, 32) * 2 - 1
    spec.eval(), critic.eval()
    with torch.no_grad():
        torch.testing.assert_close(critic(x), spec(x).flatten(), rtol=1e-5, atol=1e-6)
    assert critic(x).shape == (2,)


def test_stacked_critics_equal_one_module_per_seed_in_eval_and_training_mode():
    seeds = (3, 4)
    params = new_critics(seeds, edge=32, widths=SMALL)
    modules = []
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        fresh = WCritic(32, SMALL)
        assert all(torch.equal(v, params[k][i]) for k, v in fresh.state_dict().items())  # seeded init
        modules.append(fresh.double())  # float64 on both sides: the comparison sees the math, not rounding
    params = {k: v.double() for k, v in params.items()}
    x = torch.rand(1, len(seeds), 32, 32, 32, dtype=torch.float64) * 2 - 1
    for m in modules:
        m.eval()
    expected = torch.stack([m(x[:, i:i + 1]) for i, m in enumerate(modules)], 1).float()
    torch.testing.assert_close(critic_forward(params, x), expected, rtol=1e-5, atol=1e-7)
    for m in modules:  # training mode: one power iteration per call updates u and v
        m.train()
    expected = torch.stack([m(x[:, i:i + 1]) for i, m in enumerate(modules)], 1).float()
    torch.testing.assert_close(critic_forward(params, x, training=True), expected, rtol=1e-5, atol=1e-7)
    for i, m in enumerate(modules):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(critic_state(params, i)[k], v.float(), rtol=1e-6, atol=1e-8)


def test_concurrent_training_step_equals_each_seeds_own_wgan_gp_step():
    seeds, batch, lam = (5, 6), 2, 30.0
    params = {k: v.double() for k, v in new_critics(seeds, edge=32, widths=SMALL).items()}
    for k, p in params.items():
        p.requires_grad_(not k.endswith(("weight_u", "weight_v")))
    optimizer = torch.optim.Adam([p for p in params.values() if p.requires_grad], lr=5e-5, betas=(0.0, 0.9),
                                 weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(batch, 2, 32, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    fake = torch.rand(batch, 2, 32, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    eta = torch.rand(batch, 2, generator=g, dtype=torch.float64)
    modules = []
    for seed in seeds:
        torch.manual_seed(seed)
        modules.append(WCritic(32, SMALL).double().train())
    for _ in range(2):
        w, norms = train_step(params, optimizer, real, fake, eta, lam, clip=1.0)
        for i, m in enumerate(modules):  # the reference: the released script's step, one seed alone
            opt = getattr(m, "opt", None) or torch.optim.Adam(m.parameters(), lr=5e-5, betas=(0.0, 0.9),
                                                              weight_decay=1e-4)
            m.opt = opt
            opt.zero_grad()
            r, f = real[:, i:i + 1], fake[:, i:i + 1]
            scores = m(torch.cat([r, f]))
            w_ref = scores[:batch].mean() - scores[batch:].mean()
            e = eta[:, i].view(-1, 1, 1, 1, 1)
            x_hat = (e * r + (1 - e) * f).requires_grad_(True)
            grad, = torch.autograd.grad(m(x_hat).sum(), x_hat, create_graph=True)
            gnorm = grad.flatten(1).norm(dim=1)
            (-w_ref + lam * ((gnorm - 1) ** 2).mean()).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            assert float(w[i]) == pytest.approx(float(w_ref.detach()), rel=1e-4, abs=1e-6)
            assert float(norms[i]) == pytest.approx(float(gnorm.detach().mean()), rel=1e-4)
    for i, m in enumerate(modules):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(critic_state(params, i)[k], v.float(), rtol=1e-5, atol=1e-8)


def test_transform_follows_the_authors_rules():
    unit = torch.rand(32, 32, 32)  # [0, 1] at twice the edge: 2x average pooling, then 2 x - 1
    expected = F.avg_pool3d(unit[None, None], 2)[0] * 2 - 1
    low, high = float(expected.min()), float(expected.max())
    stretched = (expected - low) / (high - low) * 2 - 1  # pooled range is narrower than [-1, 1]: stretched
    torch.testing.assert_close(wscore_transform(unit, edge=16), stretched, rtol=1e-5, atol=1e-5)
    full = torch.linspace(-1, 1, 16 ** 3).reshape(16, 16, 16)
    torch.testing.assert_close(wscore_transform(full, edge=16)[0], full)  # reaches both ends: unchanged
    hu = torch.linspace(-1000, 1000, 16 ** 3).reshape(1, 16, 16, 16)  # min < -0.1: clamp to [-1, 1]
    out = wscore_transform(hu, edge=16)
    assert out.min() == -1 and out.max() == 1 and (out.abs() == 1).float().mean() > 0.99
    flat = torch.full((16, 16, 16), 0.5)
    assert torch.equal(wscore_transform(flat, edge=16), torch.zeros(1, 16, 16, 16))  # no stretch of a constant
    with pytest.raises(ValueError, match="NaN or inf"):
        wscore_transform(torch.full((16, 16, 16), float("inf")), edge=16)


def test_split_cuts_generators_to_the_real_count_then_sixty_percent():
    assert split_counts(10, [12, 7]) == (6, [10, 7], [6, 4])
    assert split_counts(1000, [1000, 1000]) == (600, [1000, 1000], [600, 600])


def _set(n, seed, shift):
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(0, 1, 32)[:, None, None].expand(32, 32, 32)
    return [(base * 0.8 + shift + 0.1 * torch.rand(32, 32, 32, generator=g)).clamp(0, 1) for _ in range(n)]


def test_wscore_end_to_end_on_tiny_sets_with_interval_and_seed_spread():
    real, fake, reference = _set(10, 1, 0.05), _set(10, 2, 0.05), _set(10, 3, 0.1)
    reference = [v.flip(0) for v in reference]  # the reference generator gets the anatomy upside down
    options = dict(epochs=4, edge=32, widths=SMALL, lr=2e-3, device="cpu", precision="fp32")
    result = wscore(real, fake, reference, seeds=(7, 8), bootstrap=50, **options)
    assert result["n_train"] == {"real": 6, "fake": 6, "reference": 6}
    assert result["n_held_out"] == {"real": 4, "fake": 4, "reference": 4}
    assert result["protocol"]["lambda_gp"] == 30.0 and result["protocol"]["betas"] == [0.0, 0.9]
    assert len(result["ratio_per_seed"]) == 2 and result["ratio_seed_std"] >= 0
    assert result["ratio"] == pytest.approx(np.mean(result["ratio_per_seed"]))
    assert result["w_reference"] > result["w_fake"]  # the flipped generator is farther from the real set
    low, high = result["ratio_ci95"]
    assert low <= result["ratio_bias_corrected"] <= high
    assert len(result["epochs_log"]) == 4 and all(1 <= e <= 4 for e in result["kept_epoch"])
    alone = wscore(real, fake, reference, seeds=(8,), bootstrap=0, **options)
    # seeds trained together give each seed what it gives alone
    assert alone["ratio_per_seed"][0] == pytest.approx(result["ratio_per_seed"][1], rel=1e-3)
    held = wscore(real, fake, reference, seeds=(7,), bootstrap=0, checkpoint="held_out", split="shuffled",
                  **{**options, "epochs": 1})
    assert "w_held_out" in held["epochs_log"][0] and held["protocol"]["split"] == "shuffled"
