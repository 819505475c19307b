"""The method's math, as pure tensor functions (no I/O).

Conventions: a Linear weight W is (out, in); an input-side edit uses directions B (in, m) with
orthonormal columns. The paper's closed form is W' = W - λ (W B) Bᵀ, i.e. W' = W + U Vᵀ with
U = -λ W B and V = B. Every edit vpatch writes is of the form "add U Vᵀ", so merge and unmerge are
the same operation with opposite sign (see ``merge.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def orthonormalize(B: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of span(B) with the columns' order and signs kept (QR with sign fix)."""
    if B.dim() == 1:
        B = B[:, None]
    Q, R = torch.linalg.qr(B.double())
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1
    return (Q * signs).to(torch.float32)


def projection_factors(
    W: torch.Tensor, B: torch.Tensor, strength: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """U, V such that W + U Vᵀ = W - λ (W B) Bᵀ (computed in fp32)."""
    B = B.to(torch.float32)
    return -float(strength) * (W.to(torch.float32) @ B), B.clone()


def projected_rows(W_rows: torch.Tensor, B: torch.Tensor, strength: float) -> torch.Tensor:
    """The U rows that the projection edit adds to these rows of W: -λ (W B)."""
    return -float(strength) * (W_rows @ B)


def lowrank_norm(U: torch.Tensor, V: torch.Tensor) -> float:
    """Frobenius norm of U Vᵀ without forming it."""
    g = (U.T.double() @ U.double()) * (V.T.double() @ V.double())
    return float(g.sum().clamp_min(0).sqrt())


def is_orthonormal(V: torch.Tensor, tol: float = 1e-3) -> bool:
    eye = torch.eye(V.shape[1], dtype=torch.float64)
    return bool((V.double().T @ V.double() - eye).abs().max() <= tol) if V.numel() else True


# --------------------------------------------------------------------------- the probe's math
#
# Activations arrive as (tokens, H) matrices, one per prompt and capture point. Pooling turns a pair
# (unsafe, safe) into difference samples (n, H); the refusal vector is their mean; the subspace comes
# from the covariance of the centred samples minus α times the neutral covariance.

POOLINGS = ("tokens", "mean", "last")
METHODS = ("mean", "pca", "cpca")


def _valid(acts: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    acts = acts.to(torch.float64)
    if mask is None:
        return acts
    sel = acts[mask.to(torch.bool)]
    if sel.shape[0] == 0:
        raise ValueError("a prompt has no valid tokens after masking")
    return sel


def pool(acts: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """One prompt's samples (n, H): every valid token, their mean, or the last valid token."""
    x = _valid(acts, mask)
    if mode == "tokens":
        return x
    if mode == "mean":
        return x.mean(0, keepdim=True)
    if mode == "last":
        return x[-1:]
    raise ValueError(f"pooling {mode!r} is not one of {POOLINGS}")


def pair_differences(
    unsafe: torch.Tensor,
    unsafe_mask: torch.Tensor | None,
    safe: torch.Tensor,
    safe_mask: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    """Difference samples for one pair; prompts may have different token counts.

    ``tokens``: each valid unsafe token minus the safe prompt's mean token, so a pair yields as many
    samples as the unsafe prompt has tokens and the samples' mean is the mean-pooled difference.
    ``mean``/``last``: one sample, pooled(unsafe) - pooled(safe).
    """
    if mode == "tokens":
        return _valid(unsafe, unsafe_mask) - _valid(safe, safe_mask).mean(0, keepdim=True)
    return pool(unsafe, unsafe_mask, mode) - pool(safe, safe_mask, mode)


def refusal_vector(pair_samples: list[torch.Tensor]) -> torch.Tensor:
    """r = mean over pairs of each pair's mean difference (every pair weighs the same)."""
    if not pair_samples:
        raise ValueError("no pairs")
    return torch.stack([d.to(torch.float64).mean(0) for d in pair_samples]).mean(0)


def contrastive_subspace(
    diffs: torch.Tensor,
    neutral: torch.Tensor | None,
    k: int,
    alpha: float,
    dense: bool | None = None,
    r: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenvectors of C_diff - α C_neutral by *algebraic* eigenvalue (C may be indefinite).

    Returns (U_k, their eigenvalues, descending). α = 0 or no neutral set is plain PCA.

    C has rank at most n + m (the sample counts), so when that is well below the width H the
    eigenproblem is solved inside the span of the samples and of r (p × p instead of H × H) and
    lifted back. Every direction outside that span has eigenvalue 0 and is orthogonal to r, so it
    would add nothing to U_k U_kᵀ r and is left out of U_k. When k exceeds the number of positive
    eigenvalues, the span's zero-eigenvalue directions (which hold r's part outside the samples'
    spread) come before negative ones, so PCA with k >= rank reduces to the mean difference.
    ``dense`` forces one path (tests compare the two where both are well defined).
    """
    D = diffs.to(torch.float64)
    D = D - D.mean(0, keepdim=True)
    N = None
    if neutral is not None and alpha:
        N = neutral.to(torch.float64)
        N = N - N.mean(0, keepdim=True)
    H = D.shape[1]
    p = D.shape[0] + (N.shape[0] if N is not None else 0)
    k = max(1, min(int(k), H))
    if dense if dense is not None else p >= H // 2:
        C = D.T @ D / D.shape[0]
        if N is not None:
            C = C - float(alpha) * (N.T @ N / N.shape[0])
        vals, vecs = torch.linalg.eigh((C + C.T) / 2)  # ascending
        order = torch.argsort(vals, descending=True)[:k]
        return vecs[:, order], vals[order]
    rows = (
        [D]
        + ([N] if N is not None else [])
        + ([r.to(torch.float64)[None]] if r is not None else [])
    )
    Q, S, _ = torch.linalg.svd(
        torch.cat(rows).T, full_matrices=False
    )  # an orthonormal basis of the span
    Q = Q[:, S > 1e-10 * max(float(S.max()), 1e-300)]
    Dq = D @ Q
    C = Dq.T @ Dq / D.shape[0]
    if N is not None:
        Nq = N @ Q
        C = C - float(alpha) * (Nq.T @ Nq / N.shape[0])
    vals, vecs = torch.linalg.eigh((C + C.T) / 2)
    order = torch.argsort(vals, descending=True)
    vals, vecs = vals[order], vecs[:, order]
    tol = 1e-12 * max(float(vals.abs().max()), 1e-300)
    positive = int((vals > tol).sum())
    zero = int((vals.abs() <= tol).sum())
    if k <= positive + zero:
        keep = torch.arange(k)
    else:  # after the span's zeros come the complement's (left out: orthogonal to r), then negatives
        n_neg = max(0, k - positive - zero - (H - Q.shape[1]))
        keep = torch.arange(positive + zero + n_neg)
    return Q @ vecs[:, keep], vals[keep]


@dataclass
class Directions:
    """The probe's result for one input space: B (H, m) orthonormal, plus what produced it."""

    B: torch.Tensor
    r: torch.Tensor  # the raw refusal vector (float64)
    eigenvalues: torch.Tensor | None  # of the chosen subspace (pca/cpca)
    kept: float  # ‖U_k U_kᵀ r‖ / ‖r‖: how much of r the subspace keeps
    samples: int


def refusal_directions(
    pair_samples: list[torch.Tensor],
    neutral: torch.Tensor | None = None,
    *,
    method: str = "cpca",
    rank: int = 100,
    alpha: float = 1.0,
    directions: int = 1,
) -> Directions:
    """The paper's refusal direction(s) from per-pair difference samples.

    ``mean``: u = r/‖r‖. ``pca``: r projected on the top-k principal directions of the centred
    differences. ``cpca``: the same with C = C_diff - α C_neutral. With m > 1 directions, the next
    ones are the subspace's leading eigenvectors, orthonormalised after u (Gram-Schmidt keeps u first).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if method == "cpca" and neutral is None:
        raise ValueError("cpca needs neutral activations (the recipe's neutral prompts)")
    r = refusal_vector(pair_samples)
    if float(r.norm()) == 0.0:
        raise ValueError(
            "the refusal vector is zero: unsafe and safe prompts give identical activations here"
        )
    diffs = torch.cat([d.to(torch.float64) for d in pair_samples])
    H = r.shape[0]
    vals = None
    if method == "mean":
        u = r / r.norm()
        extra = contrastive_subspace(diffs, None, directions, 0.0)[0] if directions > 1 else None
        kept = 1.0
    else:
        Uk, vals = contrastive_subspace(
            diffs, neutral, rank, alpha if method == "cpca" else 0.0, r=r
        )
        p = Uk @ (Uk.T @ r)
        if float(p.norm()) <= 1e-12 * float(r.norm()):
            raise ValueError(
                "the refusal vector has no component in the chosen subspace; raise --rank or lower --alpha"
            )
        u = p / p.norm()
        kept = float(p.norm() / r.norm())
        extra = Uk
    cols = [u]
    if directions > 1:
        for j in range(extra.shape[1]):
            if len(cols) >= directions:
                break
            v = extra[:, j].clone()
            for c in cols:
                v = v - (c @ v) * c
            if float(v.norm()) > 1e-6:
                cols.append(v / v.norm())
        if len(cols) < min(directions, H):
            raise ValueError(
                f"only {len(cols)} independent directions found; lower --directions or raise --rank"
            )
    B = torch.stack(cols, 1).to(torch.float32)
    return Directions(B, r, vals, kept, int(diffs.shape[0]))


def edit_weight(W: torch.Tensor, B: torch.Tensor, strength: float) -> torch.Tensor:
    """W' = W - λ (W B) Bᵀ in fp32: the reference for every merge (and for tests)."""
    W32 = W.to(torch.float32)
    U, V = projection_factors(W32, B, strength)
    return W32 + U @ V.T
