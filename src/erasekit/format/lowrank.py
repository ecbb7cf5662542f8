"""How a weight delta is stored at low rank, at the rank the inputs it acts on need.

A weight delta ``dW`` (out x in) is stored as ``up @ down`` (out x r, r x in). What matters is not ``dW`` itself
but what it does to the layer's inputs: for the inputs ``X`` the layer sees (tokens x in), the stored form's error
is ``|(dW - up @ down) X^T| / |dW X^T|`` (Frobenius).

The best rank-r form for that error is ``P_r dW``, where ``P_r`` projects onto the top r left singular vectors of
``dW X^T``: ``up`` is those vectors and ``down = up^T dW``. Being a projection of ``dW``'s output, it never moves
any input, seen or unseen, further than ``dW`` does (``|P_r dW x| <= |dW x|``). With ``rank="auto"`` each tensor
gets the smallest rank whose error is within ``tol``, at most ``max_rank``; the error reached is recorded. Without
inputs (``erasekit diff``, ``merge --rank``), :func:`truncated_svd`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# weight of directions the measured inputs do not reach, relative to those they do
RIDGE = 1e-3


@dataclass
class LowRank:
    up: np.ndarray  # out x r, float32
    down: np.ndarray  # r x in, float32
    error: float  # relative error of up @ down on the measured inputs (0: exact there)
    kept: float  # share of |dW|^2 (Frobenius) that up @ down keeps

    @property
    def rank(self) -> int:
        return self.up.shape[1]


def low_rank(delta: Any, inputs: Any, rank: int | str, tol: float, max_rank: int) -> LowRank:
    """``delta`` (torch, out x in) as :class:`LowRank`: of ``rank``, or with ``"auto"`` the smallest rank up to
    ``max_rank`` whose error on ``inputs`` (torch, rows x in) is at most ``tol``."""
    import torch

    dw = delta.detach().float()
    a = dw @ inputs.detach().float().T  # what the delta does to the inputs
    total, dw_sq = _squared_norm(a), _squared_norm(dw)
    cap = min(min(dw.shape), max_rank) if rank == "auto" else min(int(rank), *dw.shape)
    if total == 0.0 and rank == "auto":  # the delta does nothing to these inputs: its largest direction, error 0
        cap = 1
    # directions the inputs do not reach still count a little (RIDGE of an even spread over all of them), so that
    # the basis spans the delta's own outputs when the inputs leave some out: at full rank the form is exact
    ridge = (RIDGE * total / max(dw_sq, 1e-300)) ** 0.5 if total else 1.0
    basis = _top_left_vectors(torch.cat([a, ridge * dw], dim=1), cap)
    energy = ((basis.T @ a).double() ** 2).sum(dim=1).cumsum(0)  # on the inputs, kept by the first 1, 2, ... vectors
    errors = (1.0 - energy / total).clamp(min=0.0).sqrt() if total else torch.zeros_like(energy)
    r = cap
    if rank == "auto":
        ok = errors <= tol
        r = int(ok.nonzero()[0]) + 1 if bool(ok.any()) else cap
    up = basis[:, :r]
    down = up.T @ dw
    kept = _squared_norm(down) / dw_sq if dw_sq else 1.0
    return LowRank(up.cpu().numpy(), down.cpu().numpy(), float(errors[r - 1]), kept)


def _squared_norm(t: Any) -> float:
    import torch

    return float(torch.linalg.vector_norm(t)) ** 2


def truncated_svd(delta: np.ndarray, rank: int, oversample: int = 8, power_iterations: int = 4) -> LowRank:
    """``delta`` at ``rank`` without inputs to measure on (``erasekit diff``, ``merge --rank``): the truncated SVD,
    whose error is the Frobenius one (the error on inputs spread evenly over every direction). Exact for small
    matrices; for large ones (T5-XXL's 10240 x 4096), the randomized SVD of Halko, Martinsson & Tropp (2011) with
    power iterations and a seeded generator, which is within a hair of the exact one and costs a few products with
    ``delta`` instead of a full decomposition (seconds instead of minutes per T5-XXL matrix)."""
    a = np.asarray(delta, dtype=np.float64)
    r = min(rank, *a.shape)
    if min(a.shape) <= 4 * (r + oversample):
        u, sv, vh = np.linalg.svd(a, full_matrices=False)
    else:
        u, sv, vh = _randomized_svd(a, r + oversample, power_iterations)
    total = float((a**2).sum())
    kept = float((sv[:r] ** 2).sum()) / total if total else 1.0
    return LowRank((u[:, :r] * sv[:r]).astype(np.float32), vh[:r].astype(np.float32), max(0.0, 1.0 - kept) ** 0.5, kept)


def _randomized_svd(a: np.ndarray, k: int, power_iterations: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top ``k`` singular triplets of ``a`` (float64) from an orthonormal basis of its range, found from ``k``
    random directions refined by ``power_iterations`` passes of ``a a^T`` (each re-orthonormalised)."""
    rng = np.random.default_rng(0)
    q = np.linalg.qr(a @ rng.standard_normal((a.shape[1], k)))[0]
    for _ in range(power_iterations):
        q = np.linalg.qr(a @ np.linalg.qr(a.T @ q)[0])[0]
    u_small, sv, vh = np.linalg.svd(q.T @ a, full_matrices=False)
    return q @ u_small, sv, vh


def _top_left_vectors(a: Any, k: int, oversample: int = 8, power_iterations: int = 2) -> Any:
    """The top ``k`` left singular vectors of ``a``: exact for matrices of few rows, else by the randomized range
    finder of Halko, Martinsson & Tropp (2011) with power iterations. (``torch.svd_lowrank`` does the same but
    draws from torch's global generator, which a library call must leave alone; this one has its own, seeded.)"""
    import torch

    from .._torch import threads

    if a.shape[0] <= 4 * (k + oversample):
        return _left_vectors_of(a)[:, :k].to(a.dtype)
    gen = torch.Generator(device=a.device).manual_seed(0)
    y = a @ torch.randn(a.shape[1], k + oversample, generator=gen, device=a.device, dtype=a.dtype)
    for i in range(power_iterations + 1):
        with threads(1):
            q = torch.linalg.qr(y).Q
        if i < power_iterations:
            y = a @ (a.T @ q)
    return (q.double() @ _left_vectors_of(q.T @ a))[:, :k].to(a.dtype)


def _left_vectors_of(a: Any) -> Any:
    """All left singular vectors of a matrix of few rows, largest first, from the eigenvectors of ``a a^T``
    (float64; much faster on CPU than an SVD of a wide matrix)."""
    import torch

    from .._torch import threads

    a = a.double()
    gram = a @ a.T
    with threads(1):
        _, vectors = torch.linalg.eigh(gram)
    return vectors.flip(1)
