"""The numpy kernels behind LSH and exact KNN, against brute-force ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.knn import (
    LSHParams,
    band_codes,
    exact_top_k,
    hyperplanes,
    merge_top_k,
    score_bucket,
    score_pack,
    segment_cosines,
    top_k_rows,
)


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


def test_score_bucket_windowed_equals_plain_when_window_covers_bucket() -> None:
    v = clustered(200, 8, 4, seed=3)
    ids = np.arange(200, dtype=np.int64) * 3
    proj = v[:, 0].copy()
    plain = score_bucket(v, ids, proj, 5, max_bucket=1000, segments=())
    windowed = score_bucket(v, ids, proj, 5, max_bucket=450, segments=())  # width 225 >= n
    assert all(np.array_equal(a, b) for a, b in zip(plain[0][:3], windowed[0][:3]))


def test_oversized_bucket_costs_windows_not_all_pairs() -> None:
    v = clustered(1000, 8, 3, seed=5)
    parts = score_bucket(v, np.arange(1000), v[:, 1].copy(), 4, max_bucket=100, segments=())
    idx = np.concatenate([p[0] for p in parts])
    nidx = np.concatenate([p[1] for p in parts])
    assert set(idx.tolist()) == set(range(1000))
    assert np.all(idx != nidx)


def test_score_pack_keeps_buckets_apart() -> None:
    v = clustered(12, 4, 2, seed=1)
    group = np.array([0] * 5 + [1] * 7)
    parts = score_pack(v, np.arange(12), group, 3, ())
    idx, nidx = parts[0][0], parts[0][1]
    assert np.all(group[idx] == group[nidx])
    assert np.bincount(idx, minlength=12).tolist() == [3] * 12


def test_merge_top_k_dedupes_candidates_from_bands() -> None:
    import pandas as pd

    pairs = pd.DataFrame(
        {"idx": [1, 1, 1, 1, 2], "nidx": [7, 7, 3, 9, 1], "score": np.float32([0.8, 0.8, 0.8, 0.1, 0.5]),
         "segment_scores": [None] * 5}
    )
    merged = merge_top_k(pairs, 2)
    assert merged[merged.idx == 1].nidx.tolist() == [3, 7]
    assert merged[merged.idx == 1]["rank"].tolist() == [1, 2]
    assert merged[merged.idx == 2].nidx.tolist() == [1]


def test_lsh_buckets_recall_against_exact_on_clustered_vectors() -> None:
    """The banded signatures plus bucket scoring find most exact neighbours."""
    import pandas as pd

    v = clustered(3000, 32, 40, seed=11, spread=0.45)
    ids = np.arange(3000, dtype=np.int64)
    params = LSHParams(bands=12, bits_per_band=8, max_bucket_size=500, seed=1)
    codes, proj = band_codes(v, hyperplanes(32, params), params)
    parts = []
    for band in range(params.bands):
        for code in np.unique(codes[:, band]):
            members = np.flatnonzero(codes[:, band] == code)
            parts += score_bucket(v[members], ids[members], proj[members], 10, 500, ())
    frame = pd.DataFrame({"idx": np.concatenate([p[0] for p in parts]), "nidx": np.concatenate([p[1] for p in parts]),
                          "score": np.concatenate([p[2] for p in parts]), "segment_scores": None})
    found = merge_top_k(frame, 10)
    truth, truth_scores = exact_top_k(v, ids, 10)
    kth = truth_scores[:, -1]
    hits = (found.score.to_numpy() >= kth[found.idx.to_numpy()] - 1e-6).sum()
    recall = hits / (3000 * 10)
    assert recall >= 0.9, recall
    # and a single band with many bits finds far less: the test can fail
    weak = LSHParams(bands=1, bits_per_band=14, max_bucket_size=500, seed=1)
    codes1, proj1 = band_codes(v, hyperplanes(32, weak), weak)
    weak_hits = 0
    for code in np.unique(codes1[:, 0]):
        members = np.flatnonzero(codes1[:, 0] == code)
        for p in score_bucket(v[members], ids[members], proj1[members], 10, 500, ()):
            weak_hits += int((p[2] >= kth[p[0]] - 1e-6).sum())
    assert weak_hits / 30000 < recall - 0.2


def test_segment_cosines_recovers_modality_scores_and_nan_for_missing() -> None:
    a = np.array([[0.6, 0.0, 0.8, 0.0]], dtype=np.float32)
    b = np.array([[0.6, 0.0, 0.0, 0.0]], dtype=np.float32)
    out = segment_cosines(a, b, (("text", 0, 2), ("metadata", 2, 4)))
    assert out[0, 0] == pytest.approx(1.0)
    assert np.isnan(out[0, 1])
