"""The method's math, as pure tensor functions (no I/O).

Conventions: a Linear weight W is (out, in); an input-side edit uses directions B (in, m) with
orthonormal columns. The paper's closed form is W' = W - λ (W B) Bᵀ, i.e. W' = W + U Vᵀ with
U = -λ W B and V = B. Every edit vpatch writes is of the form "add U Vᵀ", so merge and unmerge are
the same operation with opposite sign (see ``merge.py``).
"""

from __future__ import annotations

import torch


def orthonormalize(B: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of span(B) with the columns' order and signs kept (QR with sign fix)."""
    if B.dim() == 1:
        B = B[:, None]
    Q, R = torch.linalg.qr(B.double())
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1
    return (Q * signs).to(torch.float32)


def projection_factors(W: torch.Tensor, B: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
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
