"""``diff --rank`` and ``merge --rank`` store a delta by its truncated SVD: exact on small matrices, randomized on
large ones (a full SVD of one T5-XXL FFN matrix took minutes), and then as good as exact and the same every run."""

from __future__ import annotations

import numpy as np

from erasekit.format.lowrank import truncated_svd


def _delta(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A change of decaying spectrum plus noise, as a fine-tune's delta has."""
    rng = np.random.default_rng(seed)
    signal = (rng.standard_normal((rows, 24)) * np.logspace(0, -2, 24)) @ rng.standard_normal((24, cols))
    return signal + rng.standard_normal((rows, cols)) * 1e-3


def _exact(a: np.ndarray, r: int) -> tuple[np.ndarray, float]:
    u, sv, vh = np.linalg.svd(a, full_matrices=False)
    return (u[:, :r] * sv[:r]) @ vh[:r], float((sv[r:] ** 2).sum() / (sv**2).sum()) ** 0.5


def test_a_large_delta_is_stored_as_well_as_by_the_exact_truncated_svd() -> None:
    a = _delta(600, 900)  # its smaller side exceeds 4 x (rank + oversampling): the randomized path
    got = truncated_svd(a, 16)
    best, best_error = _exact(a, 16)
    assert got.rank == 16 and got.up.shape == (600, 16) and got.down.shape == (16, 900)
    assert best_error * (1 - 1e-9) <= got.error <= best_error * 1.001
    assert np.linalg.norm(got.up.astype(np.float64) @ got.down - best) <= 1e-4 * np.linalg.norm(a)
    assert abs(got.kept - (1 - got.error**2)) < 1e-9


def test_the_randomized_path_gives_the_same_bytes_every_run() -> None:
    a = _delta(600, 900, seed=1)
    first, second = truncated_svd(a, 8), truncated_svd(a, 8)
    assert first.up.tobytes() == second.up.tobytes() and first.down.tobytes() == second.down.tobytes()


def test_a_small_delta_is_decomposed_exactly() -> None:
    a = _delta(60, 90)
    got = truncated_svd(a, 4)
    best, best_error = _exact(a, 4)
    assert abs(got.error - best_error) <= 1e-12
    np.testing.assert_allclose(got.up.astype(np.float64) @ got.down, best, rtol=0, atol=1e-6 * np.abs(a).max())
