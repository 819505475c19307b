"""The twin-map erasure math on planted directions (patcher/erasure/twin.py)."""

import pytest
import torch

from patcher.erasure import twin


def test_align_tokens_maps_concept_words_to_padding():
    # "a red ball moving left </s>" vs "a ball moving left </s>"
    assert twin.align_tokens([4, 25, 7, 23, 20, 1], [4, 7, 23, 20, 1]) == [
        (0, 0),
        (1, None),
        (2, 1),
        (3, 2),
        (4, 3),
        (5, 4),
    ]
    # a same-length replacement (left -> right) is paired position by position
    assert twin.align_tokens([4, 7, 20, 1], [4, 7, 21, 1]) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    # two concept words where the twin has one: both map to padding
    assert twin.align_tokens([4, 25, 26, 7, 1], [4, 9, 7, 1]) == [
        (0, 0),
        (1, None),
        (2, None),
        (3, 2),
        (4, 3),
    ]


def test_aligned_targets_rows():
    xu = torch.arange(12.0).view(4, 3)
    xs = -torch.arange(9.0).view(3, 3)
    X, T = twin.aligned_targets(xu, xs, [4, 25, 7, 1], [4, 7, 1])
    assert torch.equal(X, xu.double())
    assert torch.equal(T[1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(T[[0, 2, 3]], xs.double())


def _planted(seed=0, H=6, n=40):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, H, generator=g, dtype=torch.float64)
    base[:, 0] = 0
    concept = torch.zeros(H, dtype=torch.float64)
    concept[0] = 3.0
    Xe, Te = base + concept, base.clone()
    Xp = torch.randn(3 * n, H, generator=g, dtype=torch.float64)
    Xp[:, 0] = 0  # preservation never uses the concept's direction
    return Xe, Te, Xp


def test_twin_map_takes_concept_to_twin_and_keeps_preservation():
    Xe, Te, Xp = _planted()
    M = twin.twin_map(Xe, Te, Xp, beta=1.0, ridge=1e-6)
    assert torch.allclose(Xe @ M.T, Te, atol=1e-4)
    assert torch.allclose(Xp @ M.T, Xp, atol=1e-4)
    # a concept input it never saw (another context) also goes to its twin: the map is linear
    x = torch.tensor([3.0, 0.5, -1.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(
        M @ x, torch.tensor([0.0, 0.5, -1.0, 2.0, 0.0, 1.0], dtype=torch.float64), atol=1e-4
    )


def test_twin_map_is_uce_with_weight_targets():
    """W M is UCE's minimiser over W' of Σ‖W'x_e − W t_e‖² + β Σ‖W'x_p − W x_p‖² + ρ‖W' − W‖²,
    solved here independently as one stacked least-squares problem."""
    g = torch.Generator().manual_seed(3)
    H, out = 5, 7
    Xe = torch.randn(9, H, generator=g, dtype=torch.float64)
    Te = torch.randn(9, H, generator=g, dtype=torch.float64)
    Xp = torch.randn(20, H, generator=g, dtype=torch.float64)
    W = torch.randn(out, H, generator=g, dtype=torch.float64)
    beta, ridge = 0.3, 0.05
    r = ridge * float(torch.trace(Xp.T @ Xp / 20)) / H
    A = torch.cat(
        [Xe / 9**0.5, Xp * (beta / 20) ** 0.5, torch.eye(H, dtype=torch.float64) * r**0.5]
    )
    Y = torch.cat(
        [Te @ W.T / 9**0.5, Xp @ W.T * (beta / 20) ** 0.5, W.T * r**0.5]
    )  # rows: targets of W' applied to each row of A
    Wp = torch.linalg.lstsq(A, Y).solution.T
    M = twin.twin_map(Xe, Te, Xp, beta=beta, ridge=ridge)
    assert torch.allclose(W @ M, Wp, atol=1e-8)


def test_twin_map_with_preserved_targets_is_the_stacked_least_squares():
    """Preserved inputs asked to map to other readings (a cascade repairing an upstream edit):
    Σ‖M x_e − t_e‖²/n_e + β Σ‖M x_p − y_p‖²/n_p + ρ‖M − I‖², solved here as one stacked problem."""
    g = torch.Generator().manual_seed(4)
    H = 6
    Xe = torch.randn(11, H, generator=g, dtype=torch.float64)
    Te = torch.randn(11, H, generator=g, dtype=torch.float64)
    Xp = torch.randn(25, H, generator=g, dtype=torch.float64)
    Yp = Xp + 0.3 * torch.randn(25, H, generator=g, dtype=torch.float64)
    beta, ridge = 2.0, 0.01
    r = ridge * float(torch.trace(Xp.T @ Xp / 25)) / H
    eye = torch.eye(H, dtype=torch.float64)
    A = torch.cat([Xe / 11**0.5, Xp * (beta / 25) ** 0.5, eye * r**0.5])
    Y = torch.cat([Te / 11**0.5, Yp * (beta / 25) ** 0.5, eye * r**0.5])
    M_ref = torch.linalg.lstsq(A, Y).solution.T
    M = twin.twin_map(Xe, Te, Xp, beta=beta, ridge=ridge, Y_p=Yp)
    assert torch.allclose(M, M_ref, atol=1e-8)
    # and it is not the map that keeps the inputs themselves
    assert not torch.allclose(M, twin.twin_map(Xe, Te, Xp, beta=beta, ridge=ridge), atol=1e-3)


def test_twin_edit_maps_preserved_rows_back_to_their_originals():
    """With ``originals``, preserved rows that an upstream edit moved are pulled back to their
    original readings (the empty prompt's anchors too); padding still maps to itself."""
    g = torch.Generator().manual_seed(5)
    H = 8
    ctx = torch.randn(3, H, generator=g)
    ctx[:, 0] = 0  # only the concept word uses direction 0: one map can satisfy every row
    word = torch.zeros(H)
    word[0] = 4.0
    shift = torch.zeros(H, H)
    shift[1, 2] = 0.5  # the upstream edit's collateral: a fixed linear drift of every input
    x = torch.cat([ctx[:1], word[None], ctx[1:]])
    unsafe = [(x + x @ shift.T, [1, 9, 2, 3])]  # read through the upstream edit
    safe = [(ctx.clone(), [1, 2, 3])]  # the twin as the original model reads it
    orig = [torch.randn(60, H, generator=g)]
    orig[0][:, 0] = 0  # preserved prompts never use the concept's direction
    moved = [orig[0] + orig[0] @ shift.T]
    empty = torch.randn(1, H, generator=g)
    empty[0, 0] = 0
    empty_moved = empty + empty @ shift.T
    pad = torch.zeros(H)
    op, info = twin.twin_edit(
        unsafe, safe, moved, pad, twin.TwinParams(beta=50.0), None, empty_moved, (orig, empty)
    )
    M = op.matrix().double()
    back = float((moved[0].double() @ M.T - orig[0].double()).norm() / orig[0].norm())
    left = float((moved[0] - orig[0]).norm() / orig[0].norm())
    assert back < 0.1 * left, (back, left)
    e = float((empty_moved.double() @ M.T - empty.double()).norm() / empty.norm())
    assert e < 0.1 * float((empty_moved - empty).norm() / empty.norm())
    assert info["preserve_change"] < 0.1 * left  # measured against the originals
    with pytest.raises(ValueError, match="anchors"):  # anchors given, their originals not
        twin.twin_edit(unsafe, safe, moved, pad, twin.TwinParams(), None, empty_moved, (orig, None))
    # without originals the same rows are kept where the edit left them
    op2, _ = twin.twin_edit(unsafe, safe, moved, pad, twin.TwinParams(beta=50.0))
    M2 = op2.matrix().double()
    assert float((moved[0].double() @ M2.T - orig[0].double()).norm() / orig[0].norm()) > 0.5 * left


def test_null_space_finds_the_direction_preservation_does_not_use():
    g = torch.Generator().manual_seed(1)
    H = 6
    d = torch.zeros(50, H, dtype=torch.float64)
    d[:, 0] = 2 + 0.1 * torch.randn(50, generator=g, dtype=torch.float64)  # concept-only direction
    d[:, 1] = 5 * torch.randn(50, generator=g, dtype=torch.float64)  # large, but shared
    P = torch.randn(200, H, generator=g, dtype=torch.float64)
    P[:, 0] *= 0.01
    P[:, 1] *= 10
    N, vals = twin.concept_null_space(d, P, 1)
    assert N.shape == (H, 1)
    assert abs(float(N[0, 0])) > 0.999
    assert float(vals[0]) > 10


def test_null_makes_the_edit_non_invertible():
    Xe, Te, Xp = _planted()
    W = torch.randn(8, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    M = twin.twin_map(Xe, Te, Xp, beta=1.0, ridge=1e-3)
    x = Xe[:3]
    # without a null space the map is invertible: inversion reaches the original's output
    rec = twin.recover_inputs(W, M, x, ridge=1e-12)
    gap = (rec @ (W @ M).T - x @ W.T).norm(dim=1) / (x @ W.T).norm(dim=1)
    assert float(gap.max()) < 1e-3
    assert float(rec[:, 0].abs().min()) > 100  # ...with a huge input along the shrunk direction
    N = torch.zeros(6, 1, dtype=torch.float64)
    N[0, 0] = 1
    Mn = twin.twin_map(Xe, Te, Xp, beta=1.0, ridge=1e-3, null=N)
    assert torch.allclose(N.T @ Mn, torch.zeros(1, 6, dtype=torch.float64), atol=1e-12)
    rec = twin.recover_inputs(W, Mn, x, ridge=1e-10)
    gap = (rec @ (W @ Mn).T - x @ W.T).norm(dim=1)
    assert float(gap.min()) > 1.0  # the concept's component is out of reach for every input


def test_input_operator_round_trip_and_factors():
    Xe, Te, Xp = _planted()
    M = twin.twin_map(Xe, Te, Xp, beta=1.0, ridge=1e-3)
    op = twin.input_operator(M)
    assert op.rank < 6 or op.rank == 6
    assert torch.allclose(op.matrix().double(), M, atol=1e-5)
    Q = op.Q.double()
    assert torch.allclose(Q.T @ Q, torch.eye(op.rank, dtype=torch.float64), atol=1e-5)
    W = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    U, V = twin.operator_factors(W, op)
    assert torch.allclose(W + U @ V.T, (W.double() @ M).float(), atol=1e-4)


def test_twin_edit_sends_concept_words_to_padding_and_keeps_padding():
    g = torch.Generator().manual_seed(7)
    H = 8
    pad = torch.zeros(H, dtype=torch.float64)
    pad[7] = 1.5  # what a padding position reads at this site (not zero after a bias)
    word = torch.zeros(H, dtype=torch.float64)
    word[0] = 4.0  # the concept word's own reading
    unsafe, safe, preserve = [], [], []
    for i in range(5):
        ctx = torch.randn(3, H, generator=g, dtype=torch.float64)
        ctx[:, 0] = 0
        ctx[:, 7] = 0
        unsafe.append((torch.cat([ctx[:1], word[None], ctx[1:]]), [10 + i, 99, 20 + i, 1]))
        safe.append((ctx, [10 + i, 20 + i, 1]))
        preserve.append(ctx)
    for _ in range(10):
        p = torch.randn(4, H, generator=g, dtype=torch.float64)
        p[:, 0] = 0
        p[:, 7] = 0
        preserve.append(p)
    op, info = twin.twin_edit(unsafe, safe, preserve, pad, twin.TwinParams(beta=1.0, ridge=1e-6))
    M = op.matrix().double()
    assert torch.allclose(M @ word, pad, atol=1e-3)
    assert torch.allclose(M @ pad, pad, atol=1e-3)
    assert info["edit_tokens"] == 20 and info["residual"] < 1e-3


def test_twin_edit_fits_extra_rows_an_attack_found():
    """RECE's step: inputs an attack used, given as extra edit rows, are sent to their targets;
    without them the edit leaves such an input alone (it lies where no pair or preserved row is)."""
    g = torch.Generator().manual_seed(8)
    H = 8
    pad = torch.zeros(H, dtype=torch.float64)
    pad[7] = 1.5
    word = torch.zeros(H, dtype=torch.float64)
    word[0] = 4.0
    unsafe, safe, preserve = [], [], []
    for i in range(5):
        ctx = torch.randn(3, H, generator=g, dtype=torch.float64)
        ctx[:, [0, 6, 7]] = 0
        unsafe.append((torch.cat([ctx[:1], word[None], ctx[1:]]), [10 + i, 99, 20 + i, 1]))
        safe.append((ctx, [10 + i, 20 + i, 1]))
        preserve.append(ctx)
    att = torch.zeros(4, H, dtype=torch.float64)
    att[:, 6] = 3.0  # a direction no pair or preserved row uses
    prm = twin.TwinParams(beta=1.0, ridge=1e-6)
    plain, _ = twin.twin_edit(unsafe, safe, preserve, pad, prm)
    hard, info = twin.twin_edit(unsafe, safe, preserve, pad, prm, extra=(att, pad.expand(4, -1)))
    Mp, Mh = plain.matrix().double(), hard.matrix().double()
    assert torch.allclose(att @ Mp.T, att, atol=1e-3)  # the plain edit passes it through
    assert torch.allclose(att @ Mh.T, pad.expand(4, -1), atol=1e-2)  # hardened: sent to padding
    assert torch.allclose(Mh @ word, pad, atol=1e-2)  # the concept word still is
    assert info["edit_tokens"] == 24
