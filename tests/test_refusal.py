"""The probe's math on synthetic activations with planted directions (no model, no I/O)."""

import pytest
import torch

from patcher.erasure.refusal import (
    contrastive_subspace,
    edit_weight,
    is_orthonormal,
    pair_differences,
    pool,
    refusal_directions,
    refusal_vector,
)

H = 48


def unit(g: torch.Generator) -> torch.Tensor:
    v = torch.randn(H, generator=g, dtype=torch.float64)
    return v / v.norm()


def orth(v: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    for o in others:
        v = v - (o @ v) * o
    return v / v.norm()


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(abs(a @ b) / (a.norm() * b.norm()))


def planted_pairs(g, concept, n_pairs=5, tokens=(6, 9), noise=0.3, scale=3.0):
    """Prompt activations: shared content plus noise; the unsafe prompt carries the concept on its tokens."""
    pairs = []
    for i in range(n_pairs):
        base = torch.randn(H, generator=g, dtype=torch.float64)
        tu, ts = tokens[0] + i % 3, tokens[0] + (i + 1) % 3  # different token counts within a pair
        u = base + noise * torch.randn(tu, H, generator=g, dtype=torch.float64) + scale * concept
        s = base + noise * torch.randn(ts, H, generator=g, dtype=torch.float64)
        pairs.append((u, s))
    return pairs


@pytest.mark.parametrize("pooling", ["tokens", "mean", "last"])
def test_mean_difference_recovers_planted_direction(pooling):
    g = torch.Generator().manual_seed(0)
    c = unit(g)
    samples = [
        pair_differences(u, None, s, None, pooling) for u, s in planted_pairs(g, c, noise=0.1)
    ]
    d = refusal_directions(samples, method="mean")
    assert d.B.shape == (H, 1)
    assert cos(d.B[:, 0], c) > 0.98
    # control: without a planted concept the recovered vector is unrelated to c
    g2 = torch.Generator().manual_seed(1)
    null = [pair_differences(u, None, s, None, pooling) for u, s in planted_pairs(g2, c, scale=0.0)]
    assert cos(refusal_directions(null, method="mean").B[:, 0], c) < 0.6


def test_token_pooling_handles_masks_and_lengths():
    g = torch.Generator().manual_seed(2)
    u = torch.randn(10, H, generator=g)
    s = torch.randn(7, H, generator=g)
    mu = torch.zeros(10, dtype=torch.bool)
    mu[:6] = True
    d = pair_differences(u, mu, s, None, "tokens")
    assert d.shape == (6, H)
    # the token samples average to the mean-pooled difference over *valid* tokens only
    assert torch.allclose(d.mean(0), (u[:6].double().mean(0) - s.double().mean(0)))
    assert torch.allclose(pool(u, mu, "last")[0], u[5].double())
    with pytest.raises(ValueError):
        pool(u, torch.zeros(10, dtype=torch.bool), "mean")


def test_refusal_vector_weighs_pairs_equally():
    a = torch.ones(10, 3, dtype=torch.float64)
    b = -torch.ones(1, 3, dtype=torch.float64)
    assert torch.allclose(refusal_vector([a, b]), torch.zeros(3, dtype=torch.float64))


def nuisance_world(seed=3, n_pairs=40, tokens=8):
    """Differences carry the concept c and an entangled nuisance n that varies a lot, and so do neutral prompts."""
    g = torch.Generator().manual_seed(seed)
    c = unit(g)
    n = orth(unit(g), c)
    samples = []
    for _ in range(n_pairs):
        amp_n = 1.0 + 4.0 * torch.randn(
            (), generator=g, dtype=torch.float64
        )  # big variance along n, mean 1
        amp_c = 1.0 + 1.0 * torch.randn(
            (), generator=g, dtype=torch.float64
        )  # moderate variance along c, mean 1
        noise = 0.05 * torch.randn(tokens, H, generator=g, dtype=torch.float64)
        samples.append(amp_c * c + amp_n * n + noise)
    neutral = 6.0 * torch.randn(200, 1, generator=g, dtype=torch.float64) * n + 0.05 * torch.randn(
        200, H, generator=g, dtype=torch.float64
    )
    return c, n, samples, neutral


def test_cpca_suppresses_nuisance_that_pca_picks():
    c, n, samples, neutral = nuisance_world()
    pca = refusal_directions(samples, neutral, method="pca", rank=1)
    cpca = refusal_directions(samples, neutral, method="cpca", rank=1, alpha=1.0)
    assert cos(pca.B[:, 0], n) > 0.95, "plain PCA follows the high-variance nuisance"
    assert cos(cpca.B[:, 0], c) > 0.95, "cPCA removes what neutral prompts also vary along"
    assert cos(cpca.B[:, 0], n) < 0.1
    mean = refusal_directions(samples, method="mean")
    assert 0.3 < cos(mean.B[:, 0], c) < 0.95, "the raw mean-diff is entangled with n"


def test_eigen_order_is_algebraic_not_absolute():
    # C = C_diff - α C_neutral with a large *negative* eigenvalue along e0 and a small positive along e1
    e = torch.eye(H, dtype=torch.float64)
    diffs = torch.cat([e[1:2] * 1.0, -e[1:2] * 1.0])  # variance 1 along e1
    neutral = torch.cat([e[0:1] * 10.0, -e[0:1] * 10.0])  # variance 100 along e0
    Uk, vals = contrastive_subspace(diffs, neutral, 1, 1.0)
    assert cos(Uk[:, 0], e[1]) > 0.999
    assert vals[0] > 0


def test_multiple_directions_are_orthonormal_and_start_with_u():
    c, n, samples, neutral = nuisance_world(seed=4)
    one = refusal_directions(samples, neutral, method="cpca", rank=4, alpha=1.0)
    three = refusal_directions(samples, neutral, method="cpca", rank=4, alpha=1.0, directions=3)
    assert three.B.shape == (H, 3)
    assert is_orthonormal(three.B, 1e-5)
    assert torch.allclose(three.B[:, 0], one.B[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="independent directions"):
        refusal_directions(samples, neutral, method="cpca", rank=2, alpha=1.0, directions=3)


def test_cpca_needs_neutral_and_a_nonzero_vector():
    with pytest.raises(ValueError, match="neutral"):
        refusal_directions([torch.ones(2, H)], None, method="cpca")
    with pytest.raises(ValueError, match="zero"):
        refusal_directions([torch.zeros(2, H)], method="mean")


def test_closed_form_edit_nulls_u_and_spares_the_orthogonal_complement():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(20, H, generator=g)
    c, n, samples, neutral = nuisance_world(seed=6)
    B = refusal_directions(samples, neutral, method="cpca", rank=3, alpha=1.0, directions=2).B
    W1 = edit_weight(W, B, 1.0)
    assert float((W1 @ B).abs().max()) < 1e-5 * float(W.abs().max())  # W'u = 0 at λ = 1
    x = torch.randn(H, 7, generator=g)
    x_perp = x - B @ (B.T @ x)
    assert torch.allclose(
        W1 @ x_perp, W @ x_perp, atol=1e-5
    )  # inputs orthogonal to u pass unchanged
    # λ scales the removed component linearly; λ = 1 is idempotent
    W_half = edit_weight(W, B, 0.5)
    assert torch.allclose(W_half @ B, 0.5 * (W @ B), atol=1e-5)
    assert torch.allclose(edit_weight(W1, B, 1.0), W1, atol=1e-5)


def test_reduced_eigenproblem_matches_the_dense_one():
    """Few samples in a wide space: the span-restricted solve gives the dense solve's direction."""
    g = torch.Generator().manual_seed(7)
    Hw = 300
    c = torch.randn(Hw, generator=g, dtype=torch.float64)
    diffs = [c + 0.5 * torch.randn(6, Hw, generator=g, dtype=torch.float64) for _ in range(5)]
    neutral = torch.randn(40, Hw, generator=g, dtype=torch.float64) * 2.0
    D = torch.cat(diffs)
    r = refusal_vector(diffs)
    for k in (1, 3, 10):
        for alpha in (0.0, 0.5, 2.0):
            Ud, vd = contrastive_subspace(D, neutral, k, alpha, dense=True)
            Ur, vr = contrastive_subspace(D, neutral, k, alpha, dense=False, r=r)
            assert torch.allclose(vd, vr, rtol=1e-6, atol=1e-9)
            pd, pr = Ud @ (Ud.T @ r), Ur @ (Ur.T @ r)
            assert torch.allclose(pd, pr, atol=1e-8 * float(r.norm()))


def test_pca_with_rank_above_the_sample_rank_is_the_mean_difference():
    g = torch.Generator().manual_seed(8)
    samples = [torch.randn(3, H, generator=g) + 2.0 for _ in range(4)]  # 12 samples, rank <= 11 < H
    pca = refusal_directions(samples, method="pca", rank=H)
    mean = refusal_directions(samples, method="mean")
    assert cos(pca.B[:, 0], mean.B[:, 0]) > 1 - 1e-9 and abs(pca.kept - 1.0) < 1e-9
