"""Per-modality cosines of candidate pairs: :func:`recsys.knn.kernels.pair_segment_cosines`
against :func:`gathered_segment_cosines` (the kernel it replaced, kept here as the reference:
every pair's rows gathered first, norms per pair), side by side on the same random vectors.

The default shape is one task of the H&M update day's fused search: 50,000 rows of 1,396 floats
(segments text 384, image 576, metadata 404, behaviour 32; a quarter of the rows without an
image) and 115,000 pairs. Prints the best of ``--repeat`` wall times of each, the ratio, and the
largest difference between their results (their NaNs must be in the same places).

    .venv/bin/python -m benchmarks.segment_cosines [--rows 50000] [--pairs 115000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np

from recsys.knn.kernels import pair_segment_cosines
from recsys.knn.params import Segments

SEGMENTS = (("text", 0, 384), ("image", 384, 960), ("metadata", 960, 1364), ("behaviour", 1364, 1396))


def gathered_segment_cosines(a: np.ndarray, b: np.ndarray, segments: Segments) -> np.ndarray:
    """The replaced kernel: ``(p, len(segments))`` cosines of the gathered pairs ``(a[i], b[i])``."""
    out = np.full((a.shape[0], len(segments)), np.nan, dtype=np.float32)
    for j, (_, lo, hi) in enumerate(segments):
        sa, sb = a[:, lo:hi], b[:, lo:hi]
        na, nb = np.linalg.norm(sa, axis=1), np.linalg.norm(sb, axis=1)
        ok = (na > 0) & (nb > 0)
        out[ok, j] = np.einsum("ij,ij->i", sa[ok], sb[ok]) / (na[ok] * nb[ok])
    return out


def best_seconds(fn: Callable[[], np.ndarray], repeat: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), np.zeros(0)
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--pairs", type=int, default=115_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    dim = SEGMENTS[-1][2]
    vec = rng.standard_normal((args.rows, dim)).astype(np.float32)
    vec[rng.random(args.rows) < 0.25, 384:960] = 0  # articles without an image
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    rows = rng.integers(0, args.rows, args.pairs)
    cols = rng.integers(0, args.rows, args.pairs)
    gathered, old = best_seconds(lambda: gathered_segment_cosines(vec[rows], vec[cols], SEGMENTS), args.repeat)
    chunked, new = best_seconds(lambda: pair_segment_cosines(vec, rows, cols, SEGMENTS), args.repeat)
    same_nan = bool((np.isnan(old) == np.isnan(new)).all())
    both = ~np.isnan(old)
    diff = float(np.abs(old[both] - new[both]).max()) if both.any() else 0.0
    print(f"{args.pairs:,} pairs of {dim}-d rows ({len(SEGMENTS)} segments), best of {args.repeat}")
    print(f"  gathered (vec[rows], vec[cols])       {gathered:8.3f} s")
    print(f"  pair_segment_cosines(vec, rows, cols) {chunked:8.3f} s   ratio {chunked / gathered:.2f}")
    print(f"  largest difference {diff:.2e}; NaN in the same places: {same_nan}")
    return 0 if same_nan and diff <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
