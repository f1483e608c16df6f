"""The numpy and torch kernels behind LSH and exact KNN: no Spark.

Every function works on one task's arrays: dense cosine products, top-K with the contract's
tie-break (score descending, then id ascending), spherical k-means and random hyperplanes for
the hash functions, scoring of the cells a query probes, and the merge of candidate pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from recsys.knn.params import LSHParams, Segments

TOPK_SLACK = 8  # torch.topk takes k + this many, so ties at the k-th score can break on the id

SCORE_ELEMENTS = 1 << 24  # at most this many scores (64 MiB of float32) per product


def _rank(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, col_ids: np.ndarray, row_ids: np.ndarray, k: int,
    unique: bool = False,
) -> np.ndarray:
    """Positions of the first ``k`` entries of each row, ordered by row id, score descending,
    then column id ascending; duplicate (row, column) pairs count once (the best), unless the
    caller promises there are none (``unique``)."""
    r, c = row_ids[rows], col_ids[cols]
    if len(r) == 0:
        return np.zeros(0, dtype=np.int64)
    if unique:
        order = np.lexsort((c, -values, r))
    else:
        by_pair = np.lexsort((-values, c, r))
        first = np.r_[True, (np.diff(r[by_pair]) != 0) | (np.diff(c[by_pair]) != 0)]
        kept = by_pair[first]
        order = kept[np.lexsort((c[kept], -values[kept], r[kept]))]
    r = r[order]
    starts = np.r_[0, np.flatnonzero(np.diff(r)) + 1]
    rank = np.arange(len(r)) - np.repeat(starts, np.diff(np.r_[starts, len(r)]))
    return order[rank < k]


def top_k_rows(
    scores: np.ndarray, col_ids: np.ndarray, k: int, row_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` columns of each row of ``scores``, ties broken by the smaller column id.

    The reference kernel (numpy ``argpartition``); :func:`top_k_fast` gives the same answer
    with ``torch.topk`` and is what the backends use.

    Args:
        scores: ``(n, m)`` float32; ``-inf`` marks pairs that must not be returned.
        col_ids: ``(m,)`` int64 id of each column (the tie-break key).
        k: how many per row (rows with fewer finite scores return fewer).
        row_ids: ``(n,)`` ids of the rows; defaults to ``0..n-1``.

    Returns:
        ``(rows, cols, values)``: flat arrays grouped by row, each row's entries ordered by
        score descending then column id ascending; ``rows`` and ``cols`` index into ``scores``.
    """
    n, m = scores.shape
    row_ids = np.arange(n, dtype=np.int64) if row_ids is None else row_ids
    if n == 0 or m == 0 or k <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    if k < m:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = scores[np.arange(n)[:, None], part].min(axis=1)
        mask = scores >= kth[:, None]  # keeps every column tied with the k-th score
    else:
        mask = np.ones_like(scores, dtype=bool)
    mask &= np.isfinite(scores)
    rows, cols = np.nonzero(mask)
    values = scores[rows, cols]
    keep = _rank(rows, cols, values, col_ids, row_ids, k)
    return rows[keep], cols[keep], values[keep]


def top_k_fast(
    scores: Any, col_ids: np.ndarray, k: int, row_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`top_k_rows` through ``torch.topk`` (about 40× faster than ``argpartition``).

    ``torch.topk`` takes ``k + TOPK_SLACK`` columns per row; a row whose last taken score still
    equals its k-th (a tie running past the slack) is redone by :func:`top_k_rows`, so the
    result is identical, ties included.

    Args:
        scores: ``(n, m)`` float32 ``torch.Tensor`` (or ndarray); ``-inf`` excludes a pair.
        col_ids, k, row_ids: as in :func:`top_k_rows`.
    """
    import torch

    t = torch.as_tensor(scores)
    n, m = t.shape
    row_ids = np.arange(n, dtype=np.int64) if row_ids is None else row_ids
    if n == 0 or m == 0 or k <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    kk = min(k, m)
    k2 = min(m, kk + TOPK_SLACK)
    values_t, cols_t = torch.topk(t, k2, dim=1)
    values, cols = values_t.numpy(), cols_t.numpy().astype(np.int64)
    tied = np.zeros(n, dtype=bool)  # a tie with the k-th score runs past the slack
    if k2 < m:
        tied = (values[:, k2 - 1] == values[:, kk - 1]) & np.isfinite(values[:, kk - 1])
    w = min(kk + 1, k2)
    equal = (values[:, : w - 1] == values[:, 1:w]).any(axis=1) if w > 1 else np.zeros(n, dtype=bool)
    fast = ~tied & ~equal  # topk's order is already final: no equal scores to break on the id
    f_rows = np.flatnonzero(fast)
    rows = np.repeat(f_rows, kk)
    cols, values_k = cols[f_rows, :kk].ravel(), values[f_rows, :kk].ravel()
    parts = [(rows, cols, values_k)]
    slow = np.flatnonzero(equal & ~tied)
    if len(slow):
        r = np.repeat(slow, k2)
        c, v = cols_t.numpy()[slow].ravel().astype(np.int64), values[slow].ravel()
        keep = _rank(r, c, v, col_ids, row_ids, k, unique=True)
        parts.append((r[keep], c[keep], v[keep]))
    if tied.any():
        redo = np.flatnonzero(tied)
        r2, c2, v2 = top_k_rows(t[torch.from_numpy(redo)].numpy(), col_ids, k, row_ids[redo])
        parts.append((redo[r2], c2, v2))
    rows, cols, values = (np.concatenate([p[i] for p in parts]) for i in range(3))
    ok = np.isfinite(values)
    rows, cols, values = rows[ok], cols[ok], values[ok]
    if len(parts) > 1:
        order = np.lexsort((col_ids[cols], -values, rows))
        rows, cols, values = rows[order], cols[order], values[order]
    return rows, cols, values.astype(np.float32)


def segment_cosines(a: np.ndarray, b: np.ndarray, segments: Segments) -> np.ndarray:
    """Cosine of each row pair ``(a[i], b[i])`` within each segment: ``(p, len(segments))``, NaN
    where either side's segment is all zeros (the article lacks that modality); see
    :func:`pair_segment_cosines`."""
    n = a.shape[0]
    return pair_segment_cosines(np.concatenate([a, b]), np.arange(n), np.arange(n, 2 * n), segments)


def pair_segment_cosines(vec: np.ndarray, rows: np.ndarray, cols: np.ndarray, segments: Segments,
                          chunk: int = 1024) -> np.ndarray:
    """Cosine of each row pair ``(vec[rows[i]], vec[cols[i]])`` within each segment (the
    modalities of a fused vector), NaN where either side's segment is all zeros.

    Each segment's norm is computed once per row of ``vec`` and the pairs are taken ``chunk`` at
    a time (two ``(chunk, d)`` gathers): gathering every pair's rows first, with norms per pair,
    took 3-5x as long and, for one update task's ~100k fused pairs, two 0.6 GB copies
    (``benchmarks/segment_cosines.py``).

    Args:
        vec: ``(n, d)`` float32; rows, cols: ``(p,)`` int row numbers into ``vec``.

    Returns:
        ``(p, len(segments))`` float32, NaN where either side's segment is all zeros.
    """
    out = np.full((len(rows), len(segments)), np.nan, dtype=np.float32)
    if len(rows) == 0 or not segments:
        return out
    norms = np.stack([np.linalg.norm(vec[:, lo:hi], axis=1) for _, lo, hi in segments], axis=1)
    for start in range(0, len(rows), chunk):
        r, c = rows[start : start + chunk], cols[start : start + chunk]
        a, b = vec[r], vec[c]
        for j, (_, lo, hi) in enumerate(segments):
            na, nb = norms[r, j], norms[c, j]
            ok = (na > 0) & (nb > 0)
            dots = np.einsum("ij,ij->i", a[:, lo:hi], b[:, lo:hi])
            out[start : start + chunk, j] = np.where(ok, dots / np.where(ok, na * nb, 1), np.nan)
    return out


def exact_top_k(vectors: np.ndarray, ids: np.ndarray, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of every row among all rows (self excluded), by blocked products.

    Args:
        vectors: ``(n, d)`` float32, L2-normalised.
        ids: ``(n,)`` int64 tie-break ids.
        k: neighbours per row.
        block: query rows per block (memory is ``block × n`` floats).

    Returns:
        ``(neighbours, scores)``: ``(n, min(k, n-1))`` indices into ``vectors`` and float32
        scores, each row ordered by score descending then id ascending.
    """
    n = vectors.shape[0]
    kk = max(0, min(k, n - 1))
    neighbours = np.zeros((n, kk), dtype=np.int64)
    scores = np.zeros((n, kk), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        s = vectors[start:stop] @ vectors.T
        s[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        rows, cols, values = top_k_fast(s, ids, kk)
        neighbours[start:stop] = cols.reshape(stop - start, kk)
        scores[start:stop] = values.reshape(stop - start, kk)
    return neighbours, scores


def spherical_kmeans(sample: np.ndarray, cells: int, seed: int, iterations: int = 10) -> np.ndarray:
    """Spherical k-means (Lloyd with cosine assignment, Dhillon & Modha 2001): ``(cells, d)``
    float32 unit centroids of ``sample`` ``(m, d)`` (unit rows). Starts from ``cells`` distinct
    sample rows drawn with ``seed``; an emptied cell restarts at a random sample row."""
    import torch

    x = torch.from_numpy(np.array(sample, dtype=np.float32))
    m = len(x)
    cells = max(1, min(cells, m))
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(m, generator=gen)[:cells]].clone()
    for _ in range(iterations):
        assign = nearest(x, centroids, 1)[:, 0]
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=cells)
        empty = counts == 0
        if empty.any():
            sums[empty] = x[torch.randint(m, (int(empty.sum()),), generator=gen)]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids.numpy()


def nearest(x: Any, centroids: Any, p: int, chunk: int = 8192) -> Any:
    """Indices ``(n, p)`` of the ``p`` centroids of highest cosine for each row of ``x``."""
    import torch

    out = [torch.topk(x[i : i + chunk] @ centroids.T, p, dim=1).indices for i in range(0, len(x), chunk)]
    return torch.cat(out) if out else torch.zeros((0, p), dtype=torch.int64)


def hyperplanes(dim: int, params: LSHParams) -> np.ndarray:
    """``(dim, bands · bits_per_band)`` float32 Gaussian hyperplanes (``srp``)."""
    rng = np.random.default_rng(params.seed)
    return rng.standard_normal((dim, params.bands * params.bits_per_band)).astype(np.float32)


def band_codes(vectors: np.ndarray, planes: np.ndarray, params: LSHParams) -> np.ndarray:
    """``srp`` band signatures ``(n, bands)`` int64: bit j of band b is ``sign(v · h_bj) > 0``."""
    if params.bits_per_band == 0:
        return np.zeros((len(vectors), params.bands), dtype=np.int64)
    bits = (vectors @ planes) > 0
    weights = 1 << np.arange(params.bits_per_band, dtype=np.int64)
    return bits.reshape(len(vectors), params.bands, params.bits_per_band).astype(np.int64) @ weights


@dataclass(frozen=True)
class CellResult:
    """Top-K pairs of one scoring step: query row, data row (indices into the step's rows), score."""

    rows: np.ndarray
    cols: np.ndarray
    scores: np.ndarray


def score_cells(
    vectors: np.ndarray,
    ids: np.ndarray,
    homes: tuple[np.ndarray, np.ndarray],
    probes: tuple[np.ndarray, np.ndarray],
    k: int,
    max_bucket: int,
    order: np.ndarray,
    block_size: int = 2048,
    unique: bool = True,
) -> CellResult:
    """Each query's top-``k`` over the cells it probes, scored exactly.

    Args:
        vectors: ``(m, d)`` float32 unit rows.
        ids: ``(m,)`` int64 article index of each row (a row pair with equal ids is the
            article itself and never scored; tie-break key).
        homes: ``(rows, cells)`` int64 pairs: row r is a data member of cell c.
        probes: ``(rows, cells)`` int64 pairs: row r is a query of cell c.
        k: neighbours per query.
        max_bucket: a cell with more data members is ordered by ``order`` and each query is
            scored against the ``max_bucket`` members around its own position.
        order: ``(m,)`` float32 ordering key (a random projection) for oversized cells.
        block_size: query rows per product (fewer when the cell is large, so one product holds
            at most ``SCORE_ELEMENTS`` scores).
        unique: the caller promises a (query, data) pair meets in one cell only (one band per
            call); False keeps each pair's best copy.

    Returns:
        Each query row's top-``k`` (unique data *articles*, best first) over all its cells.
    """
    import torch

    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    x = torch.from_numpy(vectors)
    h_rows, h_cells = homes
    p_rows, p_cells = probes
    h_order = np.argsort(h_cells, kind="stable")
    p_order = np.argsort(p_cells, kind="stable")
    h_rows, h_cells = h_rows[h_order], h_cells[h_order]
    p_rows, p_cells = p_rows[p_order], p_cells[p_order]
    h_keys, h_start = np.unique(h_cells, return_index=True)
    h_stop = np.r_[h_start[1:], len(h_cells)]
    p_keys, p_start = np.unique(p_cells, return_index=True)
    p_stop = np.r_[p_start[1:], len(p_cells)]
    where = np.asarray(np.searchsorted(h_keys, p_keys))
    for j, cell in enumerate(p_keys):
        w = int(where[j])
        if w >= len(h_keys) or h_keys[w] != cell:
            continue
        data = h_rows[h_start[w] : h_stop[w]]
        queries = p_rows[p_start[j] : p_stop[j]]
        if len(data) <= max_bucket:
            _score(found, x, ids, queries, data, k, block_size)
            continue
        data = data[np.argsort(order[data], kind="stable")]
        width = max(1, max_bucket // 2)
        window = np.searchsorted(order[data], order[queries]) // width
        for w_idx in np.unique(window):
            lo = max(0, (int(w_idx) - 1) * width)
            _score(found, x, ids, queries[window == w_idx], data[lo : lo + 2 * width], k, block_size)
    if not found:
        empty = np.zeros(0, dtype=np.int64)
        return CellResult(empty, empty, np.zeros(0, dtype=np.float32))
    rows = np.concatenate([f[0] for f in found])
    cols = np.concatenate([f[1] for f in found])
    scores = np.concatenate([f[2] for f in found])
    # a data article is a member of one cell per band: one band per call gives no duplicates
    keep = _rank(rows, cols, scores, ids, ids, k, unique=unique)
    return CellResult(rows[keep], cols[keep], scores[keep])


def _score(
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    x: Any,
    ids: np.ndarray,
    queries: np.ndarray,
    data: np.ndarray,
    k: int,
    block_size: int,
) -> None:
    import torch

    d_ids = ids[data]
    d_vec = x[torch.from_numpy(data)].T.contiguous()
    step = max(1, min(block_size, SCORE_ELEMENTS // max(1, len(data))))
    for start in range(0, len(queries), step):
        q = queries[start : start + step]
        s = x[torch.from_numpy(q)] @ d_vec
        self_pairs = np.nonzero(ids[q][:, None] == d_ids[None, :])
        if len(self_pairs[0]):
            s[torch.from_numpy(self_pairs[0]), torch.from_numpy(self_pairs[1])] = -float("inf")
        r, c, v = top_k_fast(s, d_ids, k, ids[q])
        found.append((q[r], data[c], v))


def merge_top_k(idx: np.ndarray, nidx: np.ndarray, score: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Global top-``k`` per query from candidate pairs (duplicates from several groups or bands
    allowed): the kernel of :func:`merge_pairs`.

    Args:
        idx, nidx: ``(p,)`` int64 query and neighbour ids; score: ``(p,)`` float32.

    Returns:
        ``(positions, rank)``: the kept positions, ordered by idx, score descending, then nidx
        ascending (a duplicate pair counts once, with its best score), and ranks 1..k per idx.
    """
    rows = np.arange(len(idx))
    keep = _rank(rows, rows, score, nidx, idx, k)
    kept = idx[keep]
    starts = np.r_[0, np.flatnonzero(np.diff(kept)) + 1]
    rank = np.arange(len(keep)) - np.repeat(starts, np.diff(np.r_[starts, len(keep)])) + 1
    return keep, rank.astype(np.int32)
