"""The numpy kernels behind LSH and exact KNN, against brute-force ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.knn.kernels import (
    band_codes,
    exact_top_k,
    hyperplanes,
    merge_top_k,
    pair_segment_cosines,
    score_cells,
    segment_cosines,
    spherical_kmeans,
    top_k_fast,
    top_k_rows,
)
from recsys.knn.params import LSHParams


def clustered(n: int, d: int, clusters: int, seed: int = 0, spread: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    sizes = rng.zipf(1.6, clusters).astype(float)
    labels = rng.choice(clusters, size=n, p=sizes / sizes.sum())
    v = centres[labels] + spread * rng.standard_normal((n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def brute_force(v: np.ndarray, k: int) -> list[list[int]]:
    s = v @ v.T
    out = []
    for i in range(len(v)):
        cands = [(-float(s[i, j]), j) for j in range(len(v)) if j != i]
        out.append([j for _, j in sorted(cands)[:k]])
    return out


def test_top_k_rows_orders_by_score_then_id_and_keeps_k() -> None:
    scores = np.array([[0.5, 0.9, 0.5, -np.inf, 0.5]], dtype=np.float32)
    ids = np.array([40, 10, 30, 5, 20])
    rows, cols, values = top_k_rows(scores, ids, 3)
    assert ids[cols].tolist() == [10, 20, 30]  # 0.9 first, then the tied 0.5s by id
    assert values.tolist() == pytest.approx([0.9, 0.5, 0.5])
    assert rows.tolist() == [0, 0, 0]


def test_top_k_rows_never_returns_excluded_or_pads() -> None:
    scores = np.array([[-np.inf, 0.2], [-np.inf, -np.inf]], dtype=np.float32)
    rows, cols, _ = top_k_rows(scores, np.array([1, 2]), 5)
    assert rows.tolist() == [0] and cols.tolist() == [1]


def test_exact_top_k_matches_brute_force_with_ties() -> None:
    v = clustered(300, 16, 8)
    v[10] = v[11] = v[12]  # exact duplicates force ties
    neighbours, scores = exact_top_k(v, np.arange(300), 7, block=64)
    assert neighbours.tolist() == brute_force(v, 7)
    assert np.all(np.diff(scores, axis=1) <= 1e-7)
    assert not np.any(neighbours == np.arange(300)[:, None])


def test_top_k_fast_equals_reference_with_ties_and_exclusions() -> None:
    """torch.topk plus tie repair gives exactly the argpartition reference, ties past the slack included."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        n, m, k = int(rng.integers(1, 30)), int(rng.integers(1, 60)), int(rng.integers(1, 15))
        scores = (rng.integers(0, 4, (n, m)) if trial % 2 else rng.random((n, m))).astype(np.float32)
        scores[rng.random((n, m)) < 0.1] = -np.inf
        ids = rng.permutation(m).astype(np.int64) * 3
        ref, fast = top_k_rows(scores, ids, k), top_k_fast(scores.copy(), ids, k)
        o1 = np.lexsort((ids[ref[1]], -ref[2], ref[0]))
        o2 = np.lexsort((ids[fast[1]], -fast[2], fast[0]))
        for a, b in zip(ref, fast):
            assert np.array_equal(a[o1], b[o2]), trial


def one_cell(n: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    rows = np.arange(n, dtype=np.int64)
    return (rows, np.zeros(n, dtype=np.int64)), (rows, np.zeros(n, dtype=np.int64))


def test_score_cells_single_cell_is_exact_and_windowing_covers_when_wide() -> None:
    v = clustered(200, 8, 4, seed=3)
    ids = np.arange(200, dtype=np.int64) * 3
    homes, probes = one_cell(200)
    plain = score_cells(v, ids, homes, probes, 5, max_bucket=1000, order=v[:, 0].copy())
    windowed = score_cells(v, ids, homes, probes, 5, max_bucket=450, order=v[:, 0].copy())  # width 225 >= n
    truth, _ = exact_top_k(v, ids, 5)
    assert plain.cols.reshape(200, 5).tolist() == truth.tolist()
    assert np.array_equal(plain.cols, windowed.cols) and np.array_equal(plain.rows, windowed.rows)


def test_oversized_cell_costs_windows_not_all_pairs() -> None:
    """1,000 members with max_bucket 100: every query gets k neighbours from its window only."""
    v = clustered(1000, 8, 3, seed=5)
    order = v[:, 1].copy()
    homes, probes = one_cell(1000)
    out = score_cells(v, np.arange(1000, dtype=np.int64), homes, probes, 4, max_bucket=100, order=order)
    assert np.bincount(out.rows, minlength=1000).tolist() == [4] * 1000
    assert np.all(out.rows != out.cols)
    rank = np.empty(1000, dtype=np.int64)
    rank[np.argsort(order, kind="stable")] = np.arange(1000)
    assert np.abs(rank[out.rows] - rank[out.cols]).max() < 150  # neighbours come from the window around the query


def test_score_cells_keeps_cells_apart_and_probes_cross_them() -> None:
    v = clustered(12, 4, 2, seed=1)
    ids = np.arange(12, dtype=np.int64)
    cell = np.array([0] * 5 + [1] * 7, dtype=np.int64)
    homes = (ids, cell)
    apart = score_cells(v, ids, homes, (ids, cell), 3, 100, v[:, 0].copy())
    assert np.all(cell[apart.rows] == cell[apart.cols])
    assert np.bincount(apart.rows, minlength=12).tolist() == [3] * 12
    # row 0 also probes cell 1: its list is its top-3 over both cells, i.e. over everything
    probes = (np.r_[ids, 0], np.r_[cell, 1])
    crossed = score_cells(v, ids, homes, probes, 3, 100, v[:, 0].copy())
    truth, _ = exact_top_k(v, ids, 3)
    assert crossed.cols[crossed.rows == 0].tolist() == truth[0].tolist()


def test_spherical_kmeans_is_seeded_and_unit() -> None:
    v = clustered(2000, 16, 10, seed=2)
    a, b = spherical_kmeans(v, 20, seed=3), spherical_kmeans(v, 20, seed=3)
    assert np.array_equal(a, b) and a.shape == (20, 16)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert not np.array_equal(a, spherical_kmeans(v, 20, seed=4))
    assert spherical_kmeans(v[:5], 20, seed=3).shape == (5, 16)  # never more centroids than points


def test_merge_top_k_dedupes_candidates_from_bands() -> None:
    idx = np.array([1, 1, 1, 1, 2])
    nidx = np.array([7, 7, 3, 9, 1])
    score = np.float32([0.8, 0.8, 0.8, 0.1, 0.5])
    keep, rank = merge_top_k(idx, nidx, score, 2)
    assert idx[keep].tolist() == [1, 1, 2]
    assert nidx[keep].tolist() == [3, 7, 1]  # the duplicate 7 counts once; the tie breaks on the id
    assert rank.tolist() == [1, 2, 1]


def bucket_recall(v: np.ndarray, homes: np.ndarray, probes: np.ndarray, k: int = 10) -> float:
    """recall@k of scoring each row against the members of its probed buckets (one band)."""
    n = len(v)
    ids = np.arange(n, dtype=np.int64)
    p_rows = np.repeat(ids, probes.shape[1])
    out = score_cells(v, ids, (ids, homes.astype(np.int64)), (p_rows, probes.ravel().astype(np.int64)), k,
                      max_bucket=10_000, order=v[:, 0].copy())
    _, truth_scores = exact_top_k(v, ids, k)
    return float((out.scores >= truth_scores[out.rows, -1] - 1e-6).sum() / (n * k))


def test_kmeans_buckets_with_probes_find_neighbours_and_srp_needs_more_work() -> None:
    """k-means LSH with multi-probe reaches high recall; one k-means probe or one srp band does not."""
    v = clustered(3000, 32, 40, seed=11, spread=0.45)
    centroids = spherical_kmeans(v, 50, seed=1)
    nearest = np.argsort(-(v @ centroids.T), axis=1)
    probed = bucket_recall(v, nearest[:, 0], nearest[:, :12])  # 0.967 measured
    single = bucket_recall(v, nearest[:, 0], nearest[:, :1])
    assert probed >= 0.95, probed
    assert single < probed - 0.3, (single, probed)  # 0.467
    params = LSHParams(hash="srp", bands=1, bits_per_band=6, seed=1)
    codes = band_codes(v, hyperplanes(32, params), params)[:, 0]
    assert bucket_recall(v, codes, codes[:, None]) < probed - 0.3  # 0.330: 64 buckets of about the same size


def test_segment_cosines_recovers_modality_scores_and_nan_for_missing() -> None:
    a = np.array([[0.6, 0.0, 0.8, 0.0]], dtype=np.float32)
    b = np.array([[0.6, 0.0, 0.0, 0.0]], dtype=np.float32)
    out = segment_cosines(a, b, (("text", 0, 2), ("metadata", 2, 4)))
    assert out[0, 0] == pytest.approx(1.0)
    assert np.isnan(out[0, 1])


def test_pair_segment_cosines_equals_each_pairs_own_cosines_across_chunks() -> None:
    rng = np.random.default_rng(3)
    vec = rng.standard_normal((40, 10)).astype(np.float32)
    vec[::3, 4:8] = 0  # every third row lacks the middle segment: NaN there
    segments = (("a", 0, 4), ("b", 4, 8), ("c", 8, 10))
    rows, cols = rng.integers(0, 40, 25), rng.integers(0, 40, 25)
    got = pair_segment_cosines(vec, rows, cols, segments, chunk=7)  # 4 chunks, the last one short
    assert got.shape == (25, 3) and got.dtype == np.float32
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        for j, (_, lo, hi) in enumerate(segments):
            x, y = vec[r, lo:hi].astype(np.float64), vec[c, lo:hi].astype(np.float64)
            if not x.any() or not y.any():
                assert np.isnan(got[i, j]), (i, j)
            else:
                assert got[i, j] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y), abs=1e-6), (i, j)
    assert np.isnan(got[:, 1]).any()
    assert pair_segment_cosines(vec, rows[:0], cols[:0], segments).shape == (0, 3)
    assert segment_cosines(vec[:0], vec[:0], segments).shape == (0, 3)
