"""Edits that take a concept to its safe twin: closed-form input-side maps with a preservation set.

The paper's edit W' = W(I - λuuᵀ) pulls every input's component along u to zero, which is the
concept's value only for inputs that sit at zero along u. Here the target is the safe twin: for a
Linear W that reads token activations x, find an input-side map M with

    M = argmin  (1/n_e) Σ‖M x_e - t_e‖²  +  β (1/n_p) Σ‖M x_p - x_p‖²  +  ρ ‖M - I‖²

where x_e are the concept prompts' tokens and t_e what the safe twin's aligned tokens are (zero for
a concept word, as Wan's padding is), and x_p are preservation tokens that must keep their value.
This is UCE's closed form (Gandikota et al. 2024) with targets W t_e: its W' = W M, so ΔW = W(M - I)
is a right multiplication like the paper's projection, and a delta can store M - I = P Qᵀ and
recompute U = W P from any fine-tune's own W.

Reach (phrasings never in the pairs) comes from an optional *null space*: directions N along which
the concept's tokens differ from their twins' far more than the preservation tokens vary
(generalised eigenvectors of the two covariances, LEACE-like whitening). M is then followed by the
projector I - NNᵀ, so no input at all reaches those directions: the edit cannot be undone from the
conditioning, and synonyms lose what they share with the concept there.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

TWIN = "twin"  # the probe method name of this edit


def align_tokens(unsafe: list[int], safe: list[int]) -> list[tuple[int, int | None]]:
    """Pairs (i, j): unsafe token i should read as safe token j; j = None: as padding (zero).

    Tokens the two prompts share are paired in order; a replaced run of equal length is paired
    position by position; every other unsafe token (the concept's words) maps to padding. Safe-only
    tokens have no unsafe counterpart and are left out.
    """
    out: list[tuple[int, int | None]] = []
    sm = difflib.SequenceMatcher(a=unsafe, b=safe, autojunk=False)
    for op, i0, i1, j0, j1 in sm.get_opcodes():
        if op == "equal" or (op == "replace" and i1 - i0 == j1 - j0):
            out += [(i0 + d, j0 + d) for d in range(i1 - i0)]
        elif op in ("replace", "delete"):
            out += [(i, None) for i in range(i0, i1)]
    return sorted(out)


def aligned_targets(
    unsafe: torch.Tensor, safe: torch.Tensor, unsafe_ids: list[int], safe_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(X_e, T_e), each (n, H): one row per valid unsafe token and the input its twin gives there."""
    pairs = align_tokens(unsafe_ids, safe_ids)
    X = torch.stack([unsafe[i] for i, _ in pairs]).double()
    T = torch.stack(
        [
            safe[j].double() if j is not None else torch.zeros_like(unsafe[0], dtype=torch.float64)
            for _, j in pairs
        ]
    )
    return X, T


def concept_null_space(
    diffs: torch.Tensor, preserve: torch.Tensor, k: int, eps: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """k orthonormal directions (H, k) where the concept differences are largest *relative to* the
    preservation tokens' spread: top generalised eigenvectors of (C_d, C_p + ε tr(C_p)/H I).

    C_d is the uncentred second moment of the differences (their mean is the refusal vector, so it
    counts); C_p the preservation tokens' second moment (what removing a direction would cost).
    Returns (N, the generalised eigenvalues, descending).
    """
    D = diffs.double()
    P = preserve.double()
    H = D.shape[1]
    Cd = D.T @ D / D.shape[0]
    Cp = P.T @ P / P.shape[0]
    Cp = Cp + eps * float(torch.trace(Cp)) / H * torch.eye(H, dtype=torch.float64)
    L = torch.linalg.cholesky(Cp)
    Li = torch.linalg.inv(L)
    S = Li @ Cd @ Li.T
    vals, vecs = torch.linalg.eigh((S + S.T) / 2)
    order = torch.argsort(vals, descending=True)[: max(0, int(k))]
    G = Li.T @ vecs[:, order]  # generalised eigenvectors (Cp-orthogonal), in input space
    if G.shape[1] == 0:
        return torch.zeros(H, 0, dtype=torch.float64), vals[order]
    Q, R = torch.linalg.qr(G)
    s = torch.sign(torch.diagonal(R))
    s[s == 0] = 1
    return Q * s, vals[order]


def twin_map(
    X_e: torch.Tensor,
    T_e: torch.Tensor,
    X_p: torch.Tensor,
    beta: float = 1.0,
    ridge: float = 1e-3,
    null: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    Y_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """The input-side map M (H, H) of the module docstring, optionally followed by I - NNᵀ.

    ``ridge`` is relative to the preservation tokens' mean squared norm per dimension, so it does not
    depend on the activations' scale. With ``null`` (H, q) orthonormal, M = (I - NNᵀ) M_ls: the
    constrained minimiser of the same objective over maps whose range avoids span(N). ``keep`` (k, H):
    rows M must map to themselves exactly (M - I vanishes on their span; the null space is taken
    inside its complement), for readings that no trade-off may move. ``Y_p``: what the preserved
    inputs must map to, when that is not themselves (a site read through an upstream edit is asked
    to give back the original readings: the preservation term becomes Σ‖M x_p - y_p‖²).
    """
    Xe, Te, Xp = X_e.double(), T_e.double(), X_p.double()
    Yp = Xp if Y_p is None else Y_p.double()
    if Yp.shape != Xp.shape:
        raise ValueError(
            f"preserved targets {tuple(Yp.shape)} do not match inputs {tuple(Xp.shape)}"
        )
    if keep is not None and Y_p is not None:
        raise ValueError("rows kept exactly and preserved targets other than the inputs: not both")
    H = Xe.shape[1]
    eye = torch.eye(H, dtype=torch.float64)
    Ce = Xe.T @ Xe / Xe.shape[0]
    Cp = Xp.T @ Xp / Xp.shape[0]
    r = float(ridge) * float(torch.trace(Cp)) / H
    A = Ce + float(beta) * Cp + r * eye
    Bm = Te.T @ Xe / Xe.shape[0] + float(beta) * (Yp.T @ Xp / Xp.shape[0]) + r * eye
    if keep is None:
        M = torch.linalg.solve(A, Bm.T).T  # Bm A⁻¹ (A symmetric)
    else:
        Qc = _complement(keep.double())
        # M - I = (Bm - A) A⁻¹ unconstrained; restricted to maps that vanish on span(keep):
        M = eye + (Bm - A) @ Qc @ torch.linalg.solve(Qc.T @ A @ Qc, Qc.T)
    if null is not None and null.shape[1]:
        N = null.double()
        if keep is not None:  # the directions' part outside span(keep), orthonormalised
            U, S, _ = torch.linalg.svd(Qc.T @ N, full_matrices=False)
            N = Qc @ U[:, S > 1e-6 * float(S.max())]
        M = M - N @ (N.T @ M)
    return M


def _complement(rows: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """An orthonormal basis (H, H - rank) of the complement of the rows' span."""
    _U, S, Vh = torch.linalg.svd(rows, full_matrices=True)
    rank = int((S > tol * float(S.max())).sum()) if S.numel() else 0
    if rank >= rows.shape[1]:
        raise ValueError(
            f"the {rows.shape[0]} readings that must keep their value span the whole "
            f"{rows.shape[1]}-wide input: only the identity keeps them"
        )
    return Vh[rank:].T


@dataclass(frozen=True)
class InputOperator:
    """M - I = P Qᵀ, truncated where singular values vanish; ΔW = (W P) Qᵀ for any W."""

    P: torch.Tensor  # (H, r)
    Q: torch.Tensor  # (H, r), orthonormal columns

    @property
    def rank(self) -> int:
        return int(self.Q.shape[1])

    def matrix(self) -> torch.Tensor:
        return torch.eye(self.P.shape[0], dtype=self.P.dtype) + self.P @ self.Q.T


def input_operator(M: torch.Tensor, tol: float = 1e-6) -> InputOperator:
    """Factor M - I by SVD: P = U_r S_r, Q = V_r, dropping singular values below tol × the largest."""
    D = M.double() - torch.eye(M.shape[0], dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(D)
    if float(S.max()) == 0.0:
        raise ValueError("the map is the identity: the concept's tokens already read as the twin's")
    keep = S > tol * float(S.max())
    return InputOperator((U[:, keep] * S[keep]).float(), Vh[keep].T.contiguous().float())


def operator_factors(
    W: torch.Tensor, op: InputOperator, strength: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """U, V with W + U Vᵀ = W (I + λ P Qᵀ): the edit recomputed from this W (fp32)."""
    return float(strength) * (W.to(torch.float32) @ op.P.to(torch.float32)), op.Q.clone()


def recover_inputs(
    W: torch.Tensor, M: torch.Tensor, X: torch.Tensor, ridge: float = 1e-3
) -> torch.Tensor:
    """Closed-form concept inversion (RECE's step) at one linear site: for each row x of X, the input
    x' whose edited output W M x' is nearest to the original W x (ridge-regularised). Rows (n, H).

    If the edit can be undone from the inputs, W M x' = W x exactly; what remains is what the edit
    took out of reach.
    """
    A = W.double() @ M.double()  # (out, H)
    G = A.T @ A
    r = float(ridge) * float(torch.trace(G)) / G.shape[0]
    rhs = A.T @ (W.double() @ X.double().T)
    return torch.linalg.solve(G + r * torch.eye(G.shape[0], dtype=torch.float64), rhs).T


# --------------------------------------------------------------------------- from captured prompts

TokenActs = tuple[torch.Tensor, list[int]]  # (valid tokens (n, H), their token ids)


@dataclass(frozen=True)
class TwinParams:
    """The twin edit's settings; defaults are the ones chosen on the organism (docs/efficacy.md)."""

    beta: float = 1.0  # weight of the preservation set against the concept pairs
    ridge: float = 1e-3  # pull toward the identity, relative to the preservation tokens' scale
    null: int = 0  # concept null-space directions (no input reaches them afterwards)


def twin_edit(
    unsafe: list[TokenActs],
    safe: list[TokenActs],
    preserve: list[torch.Tensor],
    pad: torch.Tensor,
    params: TwinParams = TwinParams(),
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
    anchors: torch.Tensor | None = None,
    originals: tuple[list[torch.Tensor], torch.Tensor | None] | None = None,
) -> tuple[InputOperator, dict]:
    """The input-side operator for one site from a recipe's captures.

    ``unsafe``/``safe``: each pair's valid tokens and ids; ``preserve``: token rows that must keep
    their value (neutral prompts, the safe twins, the empty prompt of the unconditional branch);
    ``pad``: what a padding position reads at this site (the target of a concept word). Padding is
    preserved too, as many rows as there are preserved tokens, so neither the padding positions nor
    the unconditional branch move. A 2-D ``pad`` (L, H) is a learned null caption read position by
    position (padding itself never reaches the readers): a concept word at position i is sent to
    row i, and every row is kept exactly (``twin_map``'s ``keep``), not traded off. ``extra``
    (X, T): more edit rows and their targets, e.g. the site inputs an attack found and what the twin
    reads there (RECE's hardening step); they enter the least-squares fit and the null space like
    the pairs' rows. ``anchors`` (rows, e.g. the empty prompt's tokens) are weighted as padding is:
    together as much as every other preserved token. ``originals`` (the preserved rows' and the
    anchors' original readings, row for row): the inputs were read through an upstream edit and
    must map back to these, not to themselves (a cascade that repairs its feeder's collateral).
    """
    Xe, Te = [], []
    for (xu, iu), (xs, is_) in zip(unsafe, safe):
        X, T = aligned_targets(xu, xs, iu, is_)
        pairs = align_tokens(iu, is_)
        gone = torch.tensor([j is None for _, j in pairs], dtype=torch.bool)  # concept words
        # their target: padding's one reading, or a learned null caption's row at their position
        T[gone] = (
            pad.double() if pad.dim() == 1 else pad.double()[[i for i, j in pairs if j is None]]
        )
        Xe.append(X)
        Te.append(T)
    if extra is not None:
        Xe.append(extra[0].double())
        Te.append(extra[1].double())
    Xe_, Te_ = torch.cat(Xe), torch.cat(Te)
    Xp = torch.cat([p.double() for p in preserve])
    Yp = Xp if originals is None else torch.cat([p.double() for p in originals[0]])
    if Yp.shape != Xp.shape:
        raise ValueError("the preserved rows' original readings do not match them row for row")
    n = Xp.shape[0]
    keep = None
    if pad.dim() == 1:
        Xp = torch.cat([Xp, pad.double().expand(n, -1)])
        Yp = torch.cat([Yp, pad.double().expand(n, -1)])
    else:
        keep = pad.double()
    if anchors is not None and anchors.shape[0]:  # weigh as much as all other preserved tokens
        reps = max(1, n // anchors.shape[0])
        if originals is not None and originals[1] is None:
            raise ValueError("anchors read through an upstream edit need their original readings")
        to = anchors if originals is None else originals[1]
        if to.shape != anchors.shape:
            raise ValueError("the anchors' original readings do not match them row for row")
        Xp = torch.cat([Xp, anchors.double().repeat(reps, 1)])
        Yp = torch.cat([Yp, to.double().repeat(reps, 1)])
    null = None
    if params.null:
        # the projector acts on M's outputs, where the preserved rows land at their targets
        null, _ = concept_null_space(Xe_ - Te_, Yp, params.null)
    M = twin_map(
        Xe_, Te_, Xp, params.beta, params.ridge, null, keep, None if originals is None else Yp
    )
    op = input_operator(M)
    fit = float((Xe_ @ M.T - Te_).norm() / (Xe_ - Te_).norm().clamp_min(1e-12))
    if keep is not None:
        Xp, Yp = torch.cat([Xp, keep]), torch.cat([Yp, keep])
    kept = float((Xp @ M.T - Yp).norm() / Yp.norm().clamp_min(1e-12))
    return op, {
        "rank": op.rank,
        "residual": round(fit, 4),
        "preserve_change": round(kept, 4),
        "edit_tokens": int(Xe_.shape[0]),
        "preserve_tokens": int(Xp.shape[0]),
    }
