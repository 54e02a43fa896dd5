"""The MMoE paper's two-task regression (Ma et al., KDD 2018, section 4), whose task
correlation is set by one number."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from lightning_mtr.data.synthetic.common import stream, write_chunks


def mmoe_task_weights(dim: int, correlation: float, seed: int = 0, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """MMoE paper's task weights: w1 = c u1, w2 = c (p u1 + sqrt(1 - p^2) u2), so cos(w1, w2) = p.

    u1, u2 are orthonormal (QR of a seeded Gaussian matrix) and depend only on (dim, seed),
    so datasets with different correlations share them.
    """
    _check_mmoe_arguments(rows=1, correlation=correlation, dim=dim)
    q, _ = np.linalg.qr(stream(seed, "mmoe-weights").standard_normal((dim, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    return scale * u1, scale * (correlation * u1 + np.sqrt(1.0 - correlation**2) * u2)


def _check_mmoe_arguments(rows: int, correlation: float, dim: int, num_sin: int = 0, noise_std: float = 0.0) -> None:
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation}")
    if rows <= 0:
        raise ValueError(f"rows must be positive, got {rows}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2 (two orthogonal task directions), got {dim}")
    if num_sin < 0 or noise_std < 0:
        raise ValueError(f"num_sin and noise_std must be non-negative, got {num_sin} and {noise_std}")


def mmoe_regression_chunks(
    correlation: float,
    dim: int = 100,
    num_sin: int = 10,
    noise_std: float = 0.1,
    seed: int = 0,
    split: str = "train",
    shape_seed: int = 0,
    alpha_std: float = 1.0,
    scale: float = 1.0,
) -> Callable[[int, int], tuple[np.ndarray, np.ndarray]]:
    """``chunk(index, n) -> (x [n, dim], y [n, 2])``: the rows of the MMoE paper's two tasks.

    ``y_i = w_i.x + sum_k sin(alpha_k w_i.x + beta_k) + eps_i`` with x ~ N(0, I_dim),
    w_i from :func:`mmoe_task_weights`, alpha_k, beta_k shared by both tasks.
    The paper writes eps ~ N(0, 0.01); we read 0.01 as the variance, hence ``noise_std=0.1``.
    ``seed`` fixes the task pair's directions (w1, w2); ``split`` names an independent stream
    of rows for it, so ``split="val"`` is a held-out sample of the same tasks.
    alpha, beta are the paper's "given parameters" that shape the sines (it does not state them):
    drawn once by ``shape_seed``, alpha ~ N(0, ``alpha_std``^2), beta ~ N(0, 1), and kept for
    every ``seed``; ``scale`` is the paper's c (|w1| = |w2| = c). Drawn per seed, alpha, beta
    made some pairs several times harder than others for every model (one seed's targets vary
    0.27, another's 8.5)."""
    w = np.stack(mmoe_task_weights(dim, correlation, seed, scale), axis=1)  # (dim, 2)
    sin_rng = stream(shape_seed, "mmoe-sin")
    alpha, beta = alpha_std * sin_rng.standard_normal(num_sin), sin_rng.standard_normal(num_sin)

    def chunk(index: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = stream(seed, "mmoe-rows", split, index)
        x = rng.standard_normal((n, dim))
        projection = x @ w  # (n, 2)
        y = projection + np.sin(projection[..., None] * alpha + beta).sum(-1)
        return x, y + noise_std * rng.standard_normal((n, 2))

    return chunk


def mmoe_regression_arrays(rows: int, correlation: float, dim: int = 100, num_sin: int = 10,
                           noise_std: float = 0.1, seed: int = 0, split: str = "train",
                           row_group_rows: int = 65536, shape_seed: int = 0, alpha_std: float = 1.0,
                           scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The same rows as :func:`write_mmoe_regression`, in memory (float32 ``x``, ``y``)."""
    _check_mmoe_arguments(rows, correlation, dim, num_sin, noise_std)
    chunk = mmoe_regression_chunks(correlation, dim, num_sin, noise_std, seed=seed, split=split, shape_seed=shape_seed,
                                   alpha_std=alpha_std, scale=scale)
    parts = [chunk(index, min(row_group_rows, rows - start))
             for index, start in enumerate(range(0, rows, row_group_rows))]
    return (np.concatenate([x for x, _ in parts]).astype(np.float32),
            np.concatenate([y for _, y in parts]).astype(np.float32))


def write_mmoe_regression(
    path: str | Path,
    rows: int,
    correlation: float,
    dim: int = 100,
    num_sin: int = 10,
    noise_std: float = 0.1,
    seed: int = 0,
    row_group_rows: int = 65536,
    split: str = "train",
    shape_seed: int = 0,
    alpha_std: float = 1.0,
    scale: float = 1.0,
) -> Path:
    """Write :func:`mmoe_regression_chunks`' rows to Parquet: columns ``x0..x{dim-1}``, ``y1``,
    ``y2``, all float32."""
    _check_mmoe_arguments(rows, correlation, dim, num_sin, noise_std)
    chunk = mmoe_regression_chunks(correlation, dim, num_sin, noise_std, seed=seed, split=split, shape_seed=shape_seed,
                                   alpha_std=alpha_std, scale=scale)

    def columns(index: int, n: int) -> dict[str, np.ndarray]:
        x, y = chunk(index, n)
        named = {f"x{d}": x[:, d].astype(np.float32) for d in range(dim)}
        return named | {"y1": y[:, 0].astype(np.float32), "y2": y[:, 1].astype(np.float32)}

    return write_chunks(Path(path), rows, row_group_rows, columns)
