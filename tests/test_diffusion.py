"""The Bernoulli diffusion core against its definition (docs/math.md (1)-(11))."""

import itertools
import math

import pytest
import torch

from bld_t2i.config import ConfigError, DiffusionConfig
from bld_t2i.diffusion import (
    draw_times,
    flip_loss,
    guided_logits,
    keep_factors,
    p_step_prob,
    posterior_one,
    q_sample,
    q_step_sample,
    sample,
    sampling_times,
    z0_prob_from_flip_logits,
)

N = 200_000  # bits per empirical check


def _within_4se(empirical: float, p: float, n: int) -> bool:
    se = math.sqrt(max(p * (1 - p), 1e-12) / n)
    return abs(empirical - p) <= 4 * se + 1e-12


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_ends_and_monotone(schedule):
    a = keep_factors(64, schedule)
    assert a[0] == 1 and a[-1] == 0
    assert torch.all(a[1:] < a[:-1])


def test_linear_schedule_is_authors_beta_product():
    T = 64
    t = torch.arange(1, T + 1, dtype=torch.float64)
    beta = 1.0 / (T - t + 1)
    a = torch.cumprod(1 - beta, 0)
    assert torch.allclose(keep_factors(T, "linear")[1:], a, atol=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t", [1, 8, 32, 63])
def test_forward_flip_rate(schedule, t):
    T = 64
    a = keep_factors(T, schedule)
    g = torch.Generator().manual_seed(t)
    z0 = (torch.rand(N, generator=g) < 0.3).float()
    z_t = q_sample(z0, a[t].float(), g)
    rate = (z_t != z0).float().mean().item()
    assert _within_4se(rate, (1 - a[t].item()) / 2, N)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("s,t", [(4, 20), (10, 50), (1, 64)])
def test_composition_matches_direct(schedule, s, t):
    a = keep_factors(64, schedule).float()
    g = torch.Generator().manual_seed(100 * s + t)
    z0 = torch.ones(N)
    z_s = q_sample(z0, a[s], g)
    z_t = q_step_sample(z_s, a[s], a[t], g)
    rate = (z_t != z0).float().mean().item()
    assert _within_4se(rate, (1 - a[t].item()) / 2, N)


def test_sampling_is_deterministic_under_a_generator():
    a = keep_factors(16).float()
    z0 = torch.randint(0, 2, (4, 8, 3)).float()
    x = q_sample(z0, a[7], torch.Generator().manual_seed(3))
    y = q_sample(z0, a[7], torch.Generator().manual_seed(3))
    assert torch.equal(x, y)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_equals_bayes_by_enumeration(schedule):
    T = 10
    a = keep_factors(T, schedule)
    for s, t in [(0, 1), (1, 2), (2, 7), (0, 10), (5, 10), (3, 4)]:
        for z0, zt in itertools.product([0.0, 1.0], repeat=2):
            # enumerate the joint q(z_s, z_t | z_0) over z_s
            joint = {}
            for zs in (0.0, 1.0):
                p_s = (1 + a[s]) / 2 if zs == z0 else (1 - a[s]) / 2
                r = a[t] / a[s]
                p_t = (1 + r) / 2 if zt == zs else (1 - r) / 2
                joint[zs] = p_s * p_t
            brute = joint[1.0] / (joint[0.0] + joint[1.0])
            got = posterior_one(torch.tensor(zt, dtype=torch.float64), torch.tensor(z0, dtype=torch.float64), a[s], a[t])
            assert abs(got.item() - brute.item()) < 1e-6, (s, t, z0, zt)


def test_model_step_mixes_posteriors_by_predicted_z0():
    a = keep_factors(8, "linear")
    z_t = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    logits = torch.tensor([-1.0, 0.5, 2.0, -3.0], dtype=torch.float64)
    s, t = 3, 6
    p0 = z0_prob_from_flip_logits(z_t, logits)
    want = posterior_one(z_t, torch.ones(4, dtype=torch.float64), a[s], a[t]) * p0 + posterior_one(
        z_t, torch.zeros(4, dtype=torch.float64), a[s], a[t]
    ) * (1 - p0)
    assert torch.allclose(p_step_prob(z_t, logits, a[s], a[t]), want, atol=1e-12)
    # flip logit -> p(z_0 = 1): a confident "no flip" keeps z_t
    assert torch.allclose(z0_prob_from_flip_logits(z_t, torch.full_like(z_t, -30.0)), z_t, atol=1e-9)


def test_sampling_times_even_and_bounded():
    assert sampling_times(64, 64) == list(range(64, 0, -1))
    ts = sampling_times(64, 16)
    assert ts[0] == 64 and ts[-1] == 1 and len(set(ts)) == 16
    assert sampling_times(64, 1) == [64]
    with pytest.raises(ValueError):
        sampling_times(64, 65)


def _oracle(z0):
    def model_fn(z_t, t_in, cond):
        return torch.where(z_t != z0, 30.0, -30.0)  # the true flip logits, large magnitude

    return model_fn


@pytest.mark.parametrize("steps", [1, 4, 16, 64])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_oracle_sampler_returns_z0(steps, schedule):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randint(0, 2, (3, 16, 8), generator=g).float()
    out = sample(_oracle(z0), z0.shape, keep_factors(64, schedule), steps, generator=g)
    assert torch.equal(out, z0)


def test_guidance_zero_is_exactly_conditional():
    torch.manual_seed(0)
    W = torch.randn(4, 4)

    def model_fn(z, t, cond):
        return z @ W + cond[:, None, :] + t[:, None, None]

    z = torch.randint(0, 2, (2, 5, 4)).float()
    t = torch.full((2,), 0.5)
    c, n = torch.randn(2, 4), torch.zeros(2, 4)
    both = torch.cat([c, n])  # the condition and its null stacked, as the sampler stacks them once
    assert torch.equal(guided_logits(model_fn, z, t, c, both, tau=1.0, w=0.0), model_fn(z, t, c))
    # w > 0 extrapolates away from the null branch, in one batched forward
    want = 3.0 * model_fn(z, t, c) - 2.0 * model_fn(z, t, n)
    assert torch.allclose(guided_logits(model_fn, z, t, c, both, tau=1.0, w=2.0), want, atol=1e-5)
    assert torch.allclose(guided_logits(model_fn, z, t, c, both, tau=0.5, w=0.0), 2 * model_fn(z, t, c))


@pytest.mark.parametrize("inpaint", ["clamp", "renoise"])
def test_inpainting_keeps_known_bits(inpaint):
    g = torch.Generator().manual_seed(1)
    known = torch.randint(0, 2, (2, 16, 4), generator=g).float()
    mask = torch.zeros(2, 16, 1)
    mask[:, :7] = 1
    seen = []

    def model_fn(z, t, cond):
        return torch.randn(z.shape, generator=g)

    out = sample(model_fn, known.shape, keep_factors(32), 8, known=known, mask=mask, inpaint=inpaint, generator=g,
                 callback=lambda i, s, z: seen.append(s))
    assert torch.equal(out[:, :7], known[:, :7])
    assert not torch.equal(out[:, 7:], known[:, 7:])  # the rest is sampled
    assert seen[-1] == 0 and len(seen) == 8


def test_sampler_is_reproducible():
    def model_fn(z, t, cond):
        return (z - 0.5) * t[:, None, None]

    a = keep_factors(64)
    x = sample(model_fn, (2, 4, 4), a, 16, generator=torch.Generator().manual_seed(5))
    y = sample(model_fn, (2, 4, 4), a, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(x, y)


def test_balanced_loss_weights_classes_equally():
    z0 = torch.zeros(1, 100)
    z_t = torch.zeros(1, 100)
    z_t[0, :10] = 1  # 10% flipped
    logits = torch.zeros(1, 100)
    logits[0, :10] = -2.0  # wrong on flipped bits
    logits[0, 10:] = -2.0  # right on kept bits
    bce_flip = torch.nn.functional.softplus(torch.tensor(2.0))
    bce_keep = torch.nn.functional.softplus(torch.tensor(-2.0))
    got = flip_loss(logits, z0, z_t, "balanced")
    assert torch.allclose(got, (bce_flip + bce_keep) / 2, atol=1e-6)
    plain = flip_loss(logits, z0, z_t, "bce")
    assert torch.allclose(plain, 0.1 * bce_flip + 0.9 * bce_keep, atol=1e-6)
    # no flips at all: balanced falls back to the plain mean, never 0/0
    assert torch.isfinite(flip_loss(logits, z0, z0, "balanced"))


def test_authors_loss_is_the_mean_of_weighted_bce_and_differs_by_2r1mr():
    """docs/math.md (7): 'authors' = mean(w * bce) over all bits; 'balanced' = sum(w bce) / sum(w);
    per sample they differ by 2 r (1 - r), r the flip fraction."""
    g = torch.Generator().manual_seed(0)
    z0 = (torch.rand(3, 200, generator=g) < 0.5).float()
    z_t = z0.clone()
    for i, n in enumerate((10, 50, 100)):  # r = 0.05, 0.25, 0.5
        z_t[i, :n] = 1 - z_t[i, :n]
    logits = torch.randn(3, 200, generator=g)
    target = (z0 != z_t).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    r = target.mean(1, keepdim=True)
    w = torch.where(target > 0.5, 1 - r, r)
    authors = flip_loss(logits, z0, z_t, "authors", per_sample=True)
    assert torch.allclose(authors, (w * bce).mean(1), atol=1e-6)
    balanced = flip_loss(logits, z0, z_t, "balanced", per_sample=True)
    assert torch.allclose(authors, balanced * 2 * r[:, 0] * (1 - r[:, 0]), atol=1e-6)
    assert not torch.allclose(authors, balanced)


def test_t_power_one_is_the_uniform_draw_and_two_follows_its_cdf():
    """(7a): t_power 1 draws exactly what U{1..T} drew before (resumed runs see the same t);
    t_power k has P(t <= x) = (x / T)^k on 1..T."""
    T, n = 64, 200_000
    uniform = draw_times(n, T, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(uniform, torch.randint(1, T + 1, (n,), generator=torch.Generator().manual_seed(3)))
    for k in (2.0, 0.5):
        t = draw_times(n, T, k, torch.Generator().manual_seed(4))
        assert t.dtype == torch.long and t.min() >= 1 and t.max() <= T
        for x in (8, 16, 32, 48, 63):
            assert _within_4se((t <= x).double().mean().item(), (x / T) ** k, n), (k, x)
    assert (draw_times(n, T, 2.0, torch.Generator().manual_seed(4)) > 48).double().mean() == pytest.approx(0.4375, abs=0.01)
    with pytest.raises(ValueError, match="t_power"):
        draw_times(4, T, 0.0)
    with pytest.raises(ConfigError, match="diffusion.t_power"):
        DiffusionConfig(t_power=-1.0)
