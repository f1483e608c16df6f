"""Top-K nearest neighbours by cosine similarity on Spark: LSH, exact, and Spark MLlib's LSH.

Every backend returns the same table (the *top-K contract*): for each article its ``K`` most
similar other articles, ``rank`` 1..K without gaps, ordered by score descending then neighbour
``article_id`` ascending (ties break on the id); an article never lists itself; an article with
fewer than K candidates gets fewer rows, never padding. Scores are cosine similarities of the
L2-normalised input vectors (float32 dot products).

Backends (``knn.backend``):

``exact``
    Blocked all-pairs products. The vectors are cut into ``B`` blocks; each pair of blocks
    (query block, data block) is one *cell*, scored in one task as dense products of at most
    ``block_size`` query rows at a time, keeping each query's top-K (``torch.topk``). A global
    merge by query keeps the top-K over all data blocks. Memory per task is two blocks plus a
    ``block_size × block`` score matrix, never the whole ``n × n`` matrix. The ground truth.

``lsh`` (default)
    Bucketed candidates with exact re-scoring. Each of ``bands`` independent hash functions
    sends every article to one *home bucket*; a query article is scored exactly against the
    members of the ``probes`` buckets nearest to it (multi-probe), and its top-K over all
    bands is kept. Two hash families:

    - ``kmeans`` (default): k-means LSH. A bucket is a cell of a spherical k-means quantiser
      trained on a sample of the vectors; the probed buckets are the ``probes`` nearest
      centroids. Paulevé, Jégou & Amsaleg (2010), "Locality sensitive hashing: a comparison of
      hash function types and querying mechanisms", *Pattern Recognition Letters* 31(11),
      show k-means hash functions beat random projections at equal cost; multi-probe as in Lv
      et al. (2007), "Multi-Probe LSH", VLDB. Data-dependent buckets follow the data's
      density, so skewed clusters get more, not larger, buckets.
    - ``srp``: sign-random-projection LSH for cosine (Charikar 2002, "Similarity estimation
      techniques from rounding algorithms", STOC), banded as in Leskovec, Rajaraman & Ullman,
      *Mining of Massive Datasets* ch. 3.4: ``bits_per_band`` hyperplane signs per band, one
      bucket per signature, no multi-probe. Kept for comparison: on H&M text embeddings it
      needs about ten times the products of ``kmeans`` for the same recall.

    A bucket holding more than ``max_bucket_size`` members is ordered by a random projection
    and each query is scored against the window of ``max_bucket_size`` members around its own
    position, so a skewed bucket costs ``O(queries × max_bucket_size)``, never its square.
    Articles the buckets leave with fewer than ``min(K, n - 1)`` candidates get an exact search.

``mllib``
    Spark MLlib's ``BucketedRandomProjectionLSH.approxSimilarityJoin`` on the L2-normalised
    vectors (Euclidean distance ``sqrt(2 - 2 cos)``) with a threshold, then the top-K per
    article by a window: the baseline (:mod:`recsys.knn_mllib`).

Parameters and what they buy (``lsh``, measured by ``benchmarks/knn.py`` on the 99,830 H&M
text vectors, k=10, 2 cores; exact took 127 s): the default ``kmeans``, 1 band, buckets of about
60 (1,664 centroids), 20 probes: recall@10 0.953 in 38 s. 12 probes: 0.938 in 25 s. ``srp`` with
24 bands of 9 bits: 0.954 in 91 s (the last two before ``idx`` became the rank of article_id, ~6 s). Recall rises with ``probes`` and ``bands`` and falls with
smaller buckets; the work is about ``bands × probes × n × target_bucket_size`` products.

Incremental updates: :func:`fit_index` fits the hash functions once; :func:`update_top_k`
re-searches only the articles a change can affect and equals a full run with the same index.

How the work spreads (``exact`` and ``lsh``): the assignment of vectors to cells is a
``mapInArrow`` over the distributed vectors; rows ``(group, idx, vector, home cells, probed
cells)`` are shuffled so each *group* of nearby cells lands in one partition (an article is
copied once per group it touches, not once per probed cell); a second ``mapInArrow`` scores the
cells of each group as dense ``torch`` products and emits each query's top-K in that group; a
shuffle by query merges them into the global top-K. The driver holds only the hash functions
(centroids, hyperplanes), the k-means training sample (at most ``sample_size`` vectors) and
small counts: nothing collects all vectors.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    FloatType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
)

from recsys.tables import first_row

logger = logging.getLogger(__name__)

Segments = tuple[tuple[str, int, int], ...]

PAIR_SCHEMA = StructType(
    [
        StructField("idx", LongType(), False),
        StructField("nidx", LongType(), False),
        StructField("score", FloatType(), False),
    ]
)
SEGMENT_FIELD = StructField("segment_scores", ArrayType(FloatType(), False), False)


def pair_schema(segments: Segments = (), ranked: bool = False) -> StructType:
    """Schema of candidate pairs: ``idx, nidx, score`` (+ ``segment_scores`` with segments,
    + ``rank`` when ranked). Without segments the column is left out rather than null: Arrow
    transfers of null arrays cost Spark 4.0 about 12 µs a row."""
    fields = [*PAIR_SCHEMA.fields, *([SEGMENT_FIELD] if segments else [])]
    return StructType([*fields, *([StructField("rank", IntegerType(), False)] if ranked else [])])


CELL_ROW_SCHEMA = StructType(
    [
        StructField("grp", LongType(), False),
        StructField("idx", LongType(), False),
        StructField("vec", BinaryType(), False),
        StructField("homes", ArrayType(LongType(), False), False),
        StructField("probes", ArrayType(LongType(), False), False),
    ]
)
BACKENDS = ("lsh", "exact", "mllib")
TOPK_SLACK = 8  # torch.topk takes k + this many, so ties at the k-th score can break on the id
SCORE_ELEMENTS = 1 << 24  # at most this many scores (64 MiB of float32) per product
GROUP_ROWS = 50_000  # lsh: target home articles per group of cells (memory per scoring step)


@dataclass(frozen=True)
class LSHParams:
    """LSH parameters (``knn.lsh``; the module docstring gives the algorithm).

    Attributes:
        hash: ``kmeans`` (k-means buckets, multi-probe) or ``srp`` (random hyperplane signs).
        bands: independent hash functions; a pair is a candidate when any band brings it together.
        probes: ``kmeans``: buckets a query is scored against per band (its nearest centroids).
        target_bucket_size: mean articles per bucket; sets the buckets per band
            (``kmeans``: ``n / target`` centroids; ``srp`` with ``bits_per_band`` 0:
            ``ceil(log2(n / target))`` bits).
        bits_per_band: ``srp``: hyperplanes per band (0: from ``target_bucket_size``).
        max_bucket_size: larger buckets are scored in windows of this many members.
        sample_size: ``kmeans``: vectors the centroids are trained on (a deterministic sample).
        iterations: ``kmeans``: Lloyd iterations.
        seed: seed of the sample, the centroids, the hyperplanes and the window projection.
    """

    hash: str = "kmeans"
    bands: int = 1
    probes: int = 20
    target_bucket_size: int = 60
    bits_per_band: int = 0
    max_bucket_size: int = 4000
    sample_size: int = 25_000
    iterations: int = 8
    seed: int = 42

    def resolved(self, n: int) -> LSHParams:
        """With ``srp`` and ``bits_per_band == 0``, pick ``ceil(log2(n / target_bucket_size))``
        bits (at least 0: a catalogue smaller than the target is one bucket, i.e. exact)."""
        if self.hash != "srp" or self.bits_per_band > 0:
            return self
        bits = max(0, math.ceil(math.log2(max(1, n) / self.target_bucket_size)))
        return replace(self, bits_per_band=bits)

    def buckets(self, n: int) -> int:
        """Buckets per band for ``n`` articles."""
        if self.hash == "srp":
            return 1 << self.resolved(n).bits_per_band
        # k-means needs about ten sample vectors per centroid
        return int(max(1, min(round(n / self.target_bucket_size), self.sample_size // 10, n)))



@dataclass(frozen=True)
class LSHIndex:
    """Fitted LSH hash functions (:func:`fit_index`): k-means centroids or hyperplanes, and the
    grouping of buckets. Reusing one index keeps neighbour lists comparable between runs and
    makes :func:`update_top_k` equal to a full recompute."""

    params: LSHParams
    dim: int
    fitted: dict[str, Any]


# ---------------------------------------------------------------- kernels (numpy and torch, no Spark)


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
    """Cosine of each row pair within each segment: ``(p, len(segments))``, NaN where either
    side's segment is all zeros (the article lacks that modality)."""
    out = np.full((a.shape[0], len(segments)), np.nan, dtype=np.float32)
    for j, (_, lo, hi) in enumerate(segments):
        sa, sb = a[:, lo:hi], b[:, lo:hi]
        na, nb = np.linalg.norm(sa, axis=1), np.linalg.norm(sb, axis=1)
        ok = (na > 0) & (nb > 0)
        out[ok, j] = np.einsum("ij,ij->i", sa[ok], sb[ok]) / (na[ok] * nb[ok])
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
        assign = _nearest(x, centroids, 1)[:, 0]
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=cells)
        empty = counts == 0
        if empty.any():
            sums[empty] = x[torch.randint(m, (int(empty.sum()),), generator=gen)]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids.numpy()


def _nearest(x: Any, centroids: Any, p: int, chunk: int = 8192) -> Any:
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
    # a data article is a member of one cell per band, and a group holds one band: no duplicates
    keep = _rank(rows, cols, scores, ids, ids, k, unique=True)
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


# ---------------------------------------------------------------- Arrow helpers


def _vectors_of(column: pa.Array, dim: int) -> np.ndarray:
    """``(n, dim)`` float32 from an Arrow ``list<float>`` or ``binary`` column of equal-length rows."""
    if pa.types.is_binary(column.type):
        offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column) + 1]
        data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        return data.view(np.float32).reshape(len(column), dim).copy()
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), dim)


def _binary(vectors: np.ndarray) -> pa.Array:
    """Arrow ``binary`` column, one row per vector (its float32 bytes), built without copies per row."""
    n, dim = vectors.shape
    offsets = np.arange(n + 1, dtype=np.int32) * (dim * 4)
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _lists(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type))


def _pairs_batch(idx: np.ndarray, nidx: np.ndarray, score: np.ndarray, seg: np.ndarray | None) -> pa.RecordBatch:
    columns = [pa.array(idx, pa.int64()), pa.array(nidx, pa.int64()), pa.array(score, pa.float32())]
    names = ["idx", "nidx", "score"]
    if seg is not None:
        n_seg = seg.shape[1]
        columns.append(_lists(np.arange(len(idx) + 1) * n_seg, seg.ravel().astype(np.float32), pa.float32()))
        names.append("segment_scores")
    return pa.RecordBatch.from_arrays(columns, names=names)


def _cell_batch(
    grp: np.ndarray, idx: np.ndarray, vectors: np.ndarray, home_off: np.ndarray, home_val: np.ndarray,
    probe_off: np.ndarray, probe_val: np.ndarray,
) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(grp, pa.int64()), pa.array(idx, pa.int64()), _binary(vectors),
         _lists(home_off, home_val, pa.int64()), _lists(probe_off, probe_val, pa.int64())],
        schema=pa.schema([
            pa.field("grp", pa.int64(), False), pa.field("idx", pa.int64(), False), pa.field("vec", pa.binary(), False),
            pa.field("homes", pa.list_(pa.field("element", pa.int64(), False)), False),
            pa.field("probes", pa.list_(pa.field("element", pa.int64(), False)), False),
        ]),
    )


def _task_threads() -> None:
    """One torch thread per task core (more threads than cores halves throughput)."""
    import torch
    from pyspark import TaskContext

    context = TaskContext.get()
    torch.set_num_threads(max(1, int(context.cpus())) if context is not None else 1)


# ---------------------------------------------------------------- Spark


VECTOR_OK, VECTOR_NULL, VECTOR_NONFINITE, VECTOR_ZERO = 0, 1, 2, 3
PREPARED_SCHEMA = StructType(
    [
        StructField("article_id", StringType(), True),
        StructField("idx", LongType(), False),
        StructField("vec", BinaryType(), False),
        StructField("dim", IntegerType(), False),
        StructField("flag", IntegerType(), False),
    ]
)


def _prepare_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``(article_id, idx, vector list<float>)`` → :data:`PREPARED_SCHEMA`: the vector's float32
    bytes, its length and a flag (null vector, NaN/inf/null element, zero vector)."""
    for batch in batches:
        if batch.num_rows == 0:
            continue
        col = batch.column("vector")
        n = len(col)
        offsets = col.offsets.to_numpy().astype(np.int64)
        offsets = offsets - offsets[0]
        lengths = np.diff(offsets)
        values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)  # null elements → NaN
        null = col.is_null().to_numpy(zero_copy_only=False)
        finite = np.isfinite(values)
        bad = np.zeros(n, dtype=bool)
        norm2 = np.zeros(n, dtype=np.float64)
        nonempty = lengths > 0
        if len(values):
            starts = offsets[:-1][nonempty]
            bad[nonempty] = np.logical_or.reduceat(~finite, starts)
            norm2[nonempty] = np.add.reduceat(np.where(finite, values, 0).astype(np.float64) ** 2, starts)
        flag = np.where(null, VECTOR_NULL, np.where(bad, VECTOR_NONFINITE, np.where(norm2 == 0, VECTOR_ZERO, VECTOR_OK)))
        vec = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer((offsets * 4).astype(np.int32)),
                                                     pa.py_buffer(np.ascontiguousarray(values))])
        yield pa.RecordBatch.from_arrays(
            [batch.column("article_id"), batch.column("idx"), vec, pa.array(lengths.astype(np.int32)),
             pa.array(flag.astype(np.int32))],
            names=["article_id", "idx", "vec", "dim", "flag"],
        )


def prepare(vectors: DataFrame) -> tuple[DataFrame, int, int]:
    """Validate ``(article_id, vector)`` and key it for the kernels, in one Arrow pass.

    Adds ``idx`` (int64: the rank of ``article_id`` among the distinct ids, 0-based, so a pure
    function of the data however often a partition is recomputed) and
    ``vec`` (the float32 bytes, what every later stage reads: Spark's Arrow transfer of
    ``array<float>`` costs more than the bytes). The result is persisted; call ``unpersist``.

    Returns:
        ``(prepared, n, dim)``: ``article_id, idx, vec`` (plus ``dim``, ``flag``) rows, their
        count, the vector length (0 when empty).

    Raises:
        ValueError: rows without an article_id, null vectors, duplicate article_ids, vectors of different lengths, NaN/inf
            or null elements, or a zero vector (its cosine is undefined), naming how many and
            one article_id.
    """
    # idx must be a pure function of the data: cached blocks may be recomputed, and a
    # position-based id (monotonically_increasing_id after a sort) could then change under the
    # pairs already computed. The rank over the distinct ids is; only the ids pass through the
    # one window partition.
    ids = vectors.select("article_id").where(F.col("article_id").isNotNull()).distinct()
    ranks = ids.withColumn("idx", F.row_number().over(Window.orderBy("article_id")).cast("long") - 1)
    keyed = vectors.select("article_id", "vector").join(ranks, "article_id", "left")
    keyed = keyed.withColumn("idx", F.coalesce("idx", F.lit(-1).cast("long")))
    prepared = keyed.select("article_id", "idx", "vector").mapInArrow(_prepare_batches, PREPARED_SCHEMA)  # type: ignore[arg-type]
    # a private marker keeps this cache entry apart from other callers' identical plans, so
    # their unpersist cannot drop it
    prepared = prepared.withColumn("_cache", F.lit(uuid.uuid4().hex)).drop("_cache").persist()
    flag = F.col("flag")

    def first_with(code: int) -> Any:
        return F.min(F.when(flag == code, F.col("article_id")))

    stats = first_row(prepared.agg(
        F.count(F.lit(1)).alias("n"),
        F.count(F.when(F.col("idx") < 0, 1)).alias("no_id"),
        F.countDistinct("article_id").alias("ids"),
        F.min(F.when(flag != VECTOR_NULL, F.col("dim"))).alias("lo"),
        F.max(F.when(flag != VECTOR_NULL, F.col("dim"))).alias("hi"),
        *[F.count(F.when(flag == code, 1)).alias(f"n{code}") for code in (VECTOR_NULL, VECTOR_NONFINITE, VECTOR_ZERO)],
        *[first_with(code).alias(f"id{code}") for code in (VECTOR_NULL, VECTOR_NONFINITE, VECTOR_ZERO)],
    ))
    problem = None
    if stats["n"] == 0:
        return prepared, 0, 0
    if stats["no_id"]:
        problem = f"{stats['no_id']} row(s) have no article_id"
    elif stats[f"n{VECTOR_NULL}"]:
        problem = f"{stats[f'n{VECTOR_NULL}']} article(s) have a null vector, e.g. article_id {stats[f'id{VECTOR_NULL}']}"
    elif stats["ids"] != stats["n"]:
        problem = f"{stats['n'] - stats['ids']} duplicate article_id row(s); one vector per article"
    elif stats["lo"] != stats["hi"]:
        problem = f"vectors have different lengths ({stats['lo']}..{stats['hi']})"
    elif stats[f"n{VECTOR_NONFINITE}"]:
        problem = (f"{stats[f'n{VECTOR_NONFINITE}']} vector(s) hold NaN, inf or null, "
                   f"e.g. article_id {stats[f'id{VECTOR_NONFINITE}']}")
    elif stats[f"n{VECTOR_ZERO}"]:
        problem = (f"{stats[f'n{VECTOR_ZERO}']} zero vector(s) have no direction, "
                   f"e.g. article_id {stats[f'id{VECTOR_ZERO}']}")
    if problem:
        prepared.unpersist()
        raise ValueError(f"knn: {problem}")
    return prepared, int(stats["n"]), int(stats["lo"])


def _partitions(df: DataFrame) -> int:
    return int(df.sparkSession.conf.get("spark.sql.shuffle.partitions", "8") or 8)


def score_cell_rows(rows: DataFrame, dim: int, k: int, max_bucket: int, seed: int, block_size: int,
                    segments: Segments = ()) -> DataFrame:
    """Score shuffled cell rows (:data:`CELL_ROW_SCHEMA`): one group of cells at a time.

    Rows are shuffled by ``grp``; a task holds its partition's rows (Arrow, about
    ``copies × n × d × 4 / partitions`` bytes), and for each group runs :func:`score_cells` and
    emits each query's top-``k`` within the group (:func:`pair_schema`).
    """
    order_plane = np.random.default_rng(seed + 7919).standard_normal(dim).astype(np.float32)
    n_seg = len(segments)

    def flush(parts: list[pa.RecordBatch]) -> pa.RecordBatch | None:
        table = pa.Table.from_batches(parts).combine_chunks()
        vec = _vectors_of(table.column("vec").chunk(0), dim)
        ids = table.column("idx").to_numpy()
        spans = []
        for name in ("homes", "probes"):
            col = table.column(name).chunk(0)
            off = col.offsets.to_numpy()
            spans.append((np.repeat(np.arange(len(col), dtype=np.int64), np.diff(off)), col.flatten().to_numpy()))
        result = score_cells(vec, ids, spans[0], spans[1], k, max_bucket, vec @ order_plane, block_size)
        if len(result.rows) == 0:
            return None
        seg = segment_cosines(vec[result.rows], vec[result.cols], segments) if n_seg else None
        return _pairs_batch(ids[result.rows], ids[result.cols], result.scores, seg)

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        _task_threads()
        parts = [b for b in batches if b.num_rows]
        if not parts:
            return
        table = pa.Table.from_batches(parts)
        grp = table.column("grp").to_numpy()
        order = np.argsort(grp, kind="stable")
        bounds = np.r_[0, np.flatnonzero(np.diff(grp[order])) + 1, len(grp)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            out = flush([table.take(pa.array(order[lo:hi])).combine_chunks().to_batches()[0]])
            if out is not None:
                yield out

    return rows.repartition(_partitions(rows), "grp").mapInArrow(score, pair_schema(segments))  # type: ignore[arg-type]


def merge_pairs(pairs: DataFrame, k: int, segments: Segments = ()) -> DataFrame:
    """Shuffle candidate pairs by query and keep the global top-``k`` (``pair_schema(segments, ranked=True)``)."""

    def merge(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        parts = [b for b in batches if b.num_rows]
        if not parts:
            return
        table = pa.Table.from_batches(parts).combine_chunks()
        keep, rank = merge_top_k(table.column("idx").to_numpy(), table.column("nidx").to_numpy(),
                                 table.column("score").to_numpy(), k)
        out = table.take(pa.array(keep))
        yield pa.RecordBatch.from_arrays(
            [*out.combine_chunks().to_batches()[0].columns, pa.array(rank)],
            names=[*table.schema.names, "rank"],
        )

    return pairs.repartition(_partitions(pairs), "idx").mapInArrow(merge, pair_schema(segments, ranked=True))  # type: ignore[arg-type]


def exact_cell_rows(data: DataFrame, queries: DataFrame | None, n: int, n_queries: int, dim: int,
                    block_rows: int) -> DataFrame:
    """Cell rows for exact search: query block × data block grid.

    ``data`` and ``queries`` are ``(idx, vector)``; ``queries=None`` means every data row is a
    query too. Block ``b`` of a side holds ``idx mod B``; cell ``(a, b)`` scores query block
    ``a`` against data block ``b``, so a data row is copied ``A`` times and a query row ``B``
    times. ``B = ceil(n / block_rows)`` (at least ``sqrt(partitions)`` so every core has cells).
    """
    min_blocks = max(1, math.isqrt(_partitions(data)))
    d_blocks = max(min_blocks, math.ceil(n / block_rows))
    q_blocks = d_blocks if queries is None else max(1, math.ceil(n_queries / block_rows))

    def rows_for(batches: Iterator[pa.RecordBatch], as_data: bool, as_query: bool) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            idx = batch.column("idx").to_numpy()
            vec = _vectors_of(batch.column("vec"), dim)
            m = len(idx)
            cells_r, cells_c, homes, probes = [], [], [], []
            if as_data:  # cell (a, b(i)) for every query block a
                a = np.repeat(np.arange(q_blocks, dtype=np.int64)[None, :], m, 0).ravel()
                r = np.repeat(np.arange(m), q_blocks)
                cells_r.append(r)
                cells_c.append(a * d_blocks + idx[r] % d_blocks)
                homes.append(np.ones(len(r), bool))
                probes.append(np.zeros(len(r), bool))
            if as_query:  # cell (a(i), b) for every data block b
                b = np.repeat(np.arange(d_blocks, dtype=np.int64)[None, :], m, 0).ravel()
                r = np.repeat(np.arange(m), d_blocks)
                cells_r.append(r)
                cells_c.append((idx[r] % q_blocks) * d_blocks + b)
                homes.append(np.zeros(len(r), bool))
                probes.append(np.ones(len(r), bool))
            r, c = np.concatenate(cells_r), np.concatenate(cells_c)
            h, p = np.concatenate(homes), np.concatenate(probes)
            # one row per (article, cell): merge its data and query roles
            order = np.lexsort((c, r))
            r, c, h, p = r[order], c[order], h[order], p[order]
            new = np.r_[True, (np.diff(r) != 0) | (np.diff(c) != 0)]
            group_id = np.cumsum(new) - 1
            h_any = np.zeros(new.sum(), bool)
            p_any = np.zeros(new.sum(), bool)
            np.logical_or.at(h_any, group_id, h)
            np.logical_or.at(p_any, group_id, p)
            r, c = r[new], c[new]
            home_off = np.r_[0, np.cumsum(h_any)]
            probe_off = np.r_[0, np.cumsum(p_any)]
            yield _cell_batch(c, idx[r], vec[r], home_off, c[h_any], probe_off, c[p_any])

    schema = CELL_ROW_SCHEMA
    if queries is None:
        return data.select("idx", "vec").mapInArrow(lambda b: rows_for(b, True, True), schema)  # type: ignore[arg-type]
    d_rows = data.select("idx", "vec").mapInArrow(lambda b: rows_for(b, True, False), schema)  # type: ignore[arg-type]
    q_rows = queries.select("idx", "vec").mapInArrow(lambda b: rows_for(b, False, True), schema)  # type: ignore[arg-type]
    return d_rows.unionByName(q_rows)


def exact_pairs(data: DataFrame, queries: DataFrame | None, k: int, dim: int, block_size: int,
                block_rows: int, segments: Segments = ()) -> DataFrame:
    """Exact top-``k`` of each query among ``data`` (``queries=None``: every data row), merged
    (``pair_schema(segments, ranked=True)``). See :func:`exact_cell_rows`."""
    n = data.count()
    n_q = n if queries is None else queries.count()
    rows = exact_cell_rows(data, queries, n, n_q, dim, block_rows)
    pairs = score_cell_rows(rows, dim, k, max_bucket=1 << 62, seed=0, block_size=block_size, segments=segments)
    return merge_pairs(pairs, k, segments)


def lsh_cell_rows(indexed: DataFrame, dim: int, index: LSHIndex) -> DataFrame:
    """Cell rows for LSH: each article's home bucket and probed buckets in every band, one row
    per (article, group of buckets) it touches (:data:`CELL_ROW_SCHEMA`)."""
    params, fitted = index.params, index.fitted
    bands, probes = fitted["bands"], fitted["probes"]
    cell_group, groups = fitted["cell_group"], fitted["groups"]
    centroids: list[np.ndarray] = fitted.get("centroids") or []
    planes: np.ndarray | None = fitted.get("planes")

    def assign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch

        _task_threads()
        for batch in batches:
            if batch.num_rows == 0:
                continue
            idx = batch.column("idx").to_numpy()
            vec = _vectors_of(batch.column("vec"), dim)
            m = len(idx)
            if planes is not None:
                codes = band_codes(vec, planes, params)  # (m, bands)
                probed = codes[:, :, None]  # (m, bands, 1): srp probes its own bucket only
            else:
                x = torch.from_numpy(np.array(vec))
                probed = np.stack([_nearest(x, torch.from_numpy(c), probes).numpy() for c in centroids], axis=1)
            home = probed[:, :, 0]
            p = probed.shape[2]
            rows = np.repeat(np.arange(m), bands * p)
            band = np.tile(np.repeat(np.arange(bands, dtype=np.int64), p), m)
            cells = probed.reshape(-1).astype(np.int64)
            grp = band * groups + cell_group[band, cells]
            glob = (band << 32) | cells
            is_home = (probed == home[:, :, None]).reshape(-1)
            # one row per (article, group): its probed cells there, and its home cell if there
            order = np.lexsort((glob, grp, rows))
            rows, grp, glob, is_home = rows[order], grp[order], glob[order], is_home[order]
            starts = np.flatnonzero(np.r_[True, (np.diff(rows) != 0) | (np.diff(grp) != 0)])
            offsets = np.r_[starts, len(rows)]
            segment = np.repeat(np.arange(len(starts)), np.diff(offsets))
            home_count = np.bincount(segment, weights=is_home, minlength=len(starts)).astype(np.int64)
            yield _cell_batch(
                grp[starts], idx[rows[starts]], vec[rows[starts]], np.r_[0, np.cumsum(home_count)], glob[is_home],
                offsets, glob,
            )

    return indexed.select("idx", "vec").mapInArrow(assign, CELL_ROW_SCHEMA)  # type: ignore[arg-type]


def fit_hash(indexed: DataFrame, n: int, dim: int, params: LSHParams) -> dict[str, Any]:
    """The LSH hash functions, on the driver.

    ``kmeans``: for each band, :func:`spherical_kmeans` (seed ``seed + band``) on a
    deterministic sample of ``min(n, sample_size)`` vectors (ordered by a hash of article_id
    and seed, collected through Arrow). ``srp``: :func:`hyperplanes`. Buckets are then put in
    groups of nearby buckets (k-means over the centroids; for ``srp``, code modulo groups), about
    ``GROUP_ROWS`` home articles per group and at least two groups per task slot, so a query's
    probes mostly fall in one group and its vector is shuffled once per group, not per probe.
    """
    cells = params.buckets(n)
    n_parts = _partitions(indexed)
    groups = int(max(1, min(cells, max(math.ceil(n / GROUP_ROWS), math.ceil(2 * n_parts / params.bands)))))
    fitted: dict[str, Any] = {"bands": params.bands, "cells": cells, "groups": groups}
    if params.hash == "srp":
        resolved = params.resolved(n)
        cell_group = np.tile(np.arange(cells, dtype=np.int64) % groups, (params.bands, 1))
        fitted.update(planes=hyperplanes(dim, resolved), probes=1, cell_group=cell_group)
        return fitted
    import torch

    sample, _ = sample_vectors(indexed, min(n, params.sample_size), params.seed, dim)
    centroids = [spherical_kmeans(sample, cells, params.seed + b, params.iterations) for b in range(params.bands)]
    cells = len(centroids[0])
    groups = min(groups, cells)
    # one grouping for all bands would mix unrelated buckets: group each band's own centroids
    # (cell ids are per band; groups are offset by band in the assignment)
    # group nearby buckets: k-means over band 0's centroids; every band's buckets join the
    # group of their nearest grouping centroid (group ids are offset by band in the assignment)
    grouping = torch.from_numpy(spherical_kmeans(centroids[0], groups, params.seed, params.iterations))
    cell_group = np.stack([_nearest(torch.from_numpy(c), grouping, 1)[:, 0].numpy() for c in centroids])
    fitted.update(centroids=centroids, probes=min(params.probes, cells), cells=cells, groups=groups,
                  cell_group=cell_group.astype(np.int64))
    return fitted


def sample_vectors(indexed: DataFrame, n: int, seed: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic sample of about ``n`` vectors ``(m, d)`` float32 and their ``idx``: the
    articles whose hash of (article_id, seed) falls below ``n / count``, brought to the driver
    through Arrow (no sort)."""
    total = indexed.count()
    if total == 0 or n <= 0:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    scale = 1 << 30
    cut = int(min(1.0, n / total) * scale)
    chosen = indexed.where(F.pmod(F.xxhash64("article_id", F.lit(seed)), F.lit(scale)) < cut)
    table = chosen.select("idx", "vec").toArrow()
    if table.num_rows == 0:
        return np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    return _vectors_of(table.column("vec").combine_chunks(), dim), table.column("idx").to_numpy()


def top_k(
    vectors: DataFrame,
    k: int,
    backend: str = "lsh",
    params: LSHParams = LSHParams(),
    segments: Segments = (),
    block_size: int = 2048,
    block_rows: int = 25_000,
    mllib: Any = None,
    index: LSHIndex | None = None,
) -> DataFrame:
    """Top-``k`` neighbours of every article (the module docstring gives the contract).

    Args:
        vectors: ``(article_id string, vector array<float>)``, one row per article, vectors
            L2-normalised and of one length.
        k: neighbours per article, >= 1.
        backend: ``lsh``, ``exact`` or ``mllib``.
        params: LSH parameters.
        segments: ``(name, start, end)`` slices of the vector whose cosines are reported too
            (the modalities inside a fused vector).
        block_size: query rows per dense product.
        block_rows: ``exact``: rows per block of the query × data grid.
        mllib: :class:`recsys.knn_mllib.MLlibParams` for the ``mllib`` backend.
        index: ``lsh``: hash functions from :func:`fit_index` to reuse (``params`` are then
            ignored); by default they are fitted on these vectors.

    Returns:
        ``article_id, rank, neighbour_id, score, segment_scores`` (``array<float>`` in
        ``segments`` order, NaN for a missing modality; null without segments), computed
        before the call returns (a local checkpoint): the caches used on the way are
        unpersisted and the session's cache holds nothing of it.

    Raises:
        ValueError: ``k < 1``, unknown backend, or invalid vectors (see :func:`prepare`).
    """
    if k < 1:
        raise ValueError(f"knn: k must be >= 1, got {k}")
    if backend not in BACKENDS:
        raise ValueError(f"knn: backend must be one of {list(BACKENDS)}, got {backend!r}")
    indexed, n, dim = prepare(vectors)
    cached = [indexed]
    try:
        spark = indexed.sparkSession
        if dim == 0 or n < 2:
            ranked = spark.createDataFrame([], pair_schema(segments, ranked=True))
        elif backend == "exact":
            ranked = exact_pairs(indexed, None, k, dim, block_size, block_rows, segments)
        elif backend == "mllib":
            from recsys.knn_mllib import MLlibParams, mllib_pairs

            with_idx = vectors.select("article_id", "vector").join(indexed.select("article_id", "idx"), "article_id")
            ranked = mllib_pairs(with_idx, k, mllib or MLlibParams(), n, dim)
            if segments:
                ranked = with_segment_scores(indexed, ranked, dim, segments)
        else:
            resolved = params.resolved(n)
            logger.info("lsh: %d vectors, hash %s, %d bands, %d buckets per band, %d probes", n, resolved.hash,
                        resolved.bands, resolved.buckets(n), resolved.probes)
            if index is None:
                index = LSHIndex(resolved, dim, fit_hash(indexed, n, dim, resolved))
            elif index.dim != dim:
                raise ValueError(f"knn: the LSH index was fitted on {index.dim}-d vectors, these have {dim}")
            resolved = index.params
            pairs = score_cell_rows(lsh_cell_rows(indexed, dim, index), dim, k, resolved.max_bucket_size,
                                    resolved.seed, block_size, segments)
            ranked = _top_up(indexed, merge_pairs(pairs, k, segments), n, k, dim, segments, block_size, block_rows,
                             cached)
        return _materialised(_named(ranked, indexed.select("idx", "article_id"), segments))
    finally:
        for df in cached:
            df.unpersist()


def _materialised(result: DataFrame) -> DataFrame:
    """``result`` computed once and kept as a local checkpoint, so the caches it was computed
    from can be unpersisted. The checkpoint's blocks (memory, spilling to disk) go when the
    returned DataFrame is garbage-collected (Spark's ContextCleaner); nothing stays in the
    session's cache for a caller to unpersist."""
    return result.localCheckpoint(eager=True)


def _named(ranked: DataFrame, names: DataFrame, segments: Segments) -> DataFrame:
    """Ranked ``idx`` pairs → the top-K table (``article_id, rank, neighbour_id, score, segment_scores``)."""
    return (
        ranked.join(names, "idx")
        .join(names.select(F.col("idx").alias("nidx"), F.col("article_id").alias("neighbour_id")), "nidx")
        .select("article_id", "rank", "neighbour_id", "score",
                F.col("segment_scores") if segments else F.lit(None).cast("array<float>").alias("segment_scores"))
    )


def with_segment_scores(indexed: DataFrame, ranked: DataFrame, dim: int, segments: Segments) -> DataFrame:
    """Fill ``segment_scores`` of ranked pairs from the vectors (two joins; for backends that do
    not score segments themselves)."""
    vec = indexed.select("idx", "vec")
    joined = ranked.join(vec, "idx").join(vec.select(F.col("idx").alias("nidx"), F.col("vec").alias("nvec")), "nidx")

    def fill(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            a = _vectors_of(batch.column("vec"), dim)
            b = _vectors_of(batch.column("nvec"), dim)
            seg = segment_cosines(a, b, segments)
            pairs = _pairs_batch(batch.column("idx").to_numpy(), batch.column("nidx").to_numpy(),
                                 batch.column("score").to_numpy(), seg)
            yield pa.RecordBatch.from_arrays([*pairs.columns, batch.column("rank")],
                                             names=[*pairs.schema.names, "rank"])

    columns = joined.select("idx", "nidx", "score", "rank", "vec", "nvec")
    return columns.mapInArrow(fill, pair_schema(segments, ranked=True))  # type: ignore[arg-type]


def _top_up(indexed: DataFrame, ranked: DataFrame, n: int, k: int, dim: int, segments: Segments,
            block_size: int, block_rows: int, cached: list[DataFrame]) -> DataFrame:
    """Exact search for the articles LSH left with fewer than ``min(k, n - 1)`` neighbours.

    Such articles share no bucket with enough others (outliers); :func:`exact_pairs` scans
    them against all vectors. A large share of them means the LSH parameters are too strict.
    What it persists is appended to ``cached``: the caller unpersists it once the returned
    lists are materialised.
    """
    ranked = ranked.persist()
    cached.append(ranked)
    want = min(k, n - 1)
    counts = ranked.groupBy("idx").agg(F.count(F.lit(1)).alias("found"))
    short = (
        indexed.select("idx", "vec")
        .join(counts, "idx", "left")
        .where(F.coalesce("found", F.lit(0)) < want)
        .select("idx", "vec")
        .persist()
    )
    cached.append(short)
    n_short = short.count()
    if n_short == 0:
        return ranked
    logger.info("lsh: %d of %d articles had fewer than %d candidates; exact search for them", n_short, n, want)
    extra = exact_pairs(indexed, short, k, dim, block_size, block_rows, segments)
    kept = ranked.join(short.select("idx"), "idx", "left_anti")
    return kept.unionByName(extra)


def fit_index(vectors: DataFrame, params: LSHParams = LSHParams()) -> LSHIndex:
    """Fit the LSH hash functions on ``(article_id, vector)`` (see :func:`fit_hash`).

    Raises:
        ValueError: invalid vectors (see :func:`prepare`), or an empty catalogue.
    """
    indexed, n, dim = prepare(vectors)
    try:
        if n == 0:
            raise ValueError("knn: cannot fit an LSH index on no vectors")
        resolved = params.resolved(n)
        return LSHIndex(resolved, dim, fit_hash(indexed, n, dim, resolved))
    finally:
        indexed.unpersist()


def update_top_k(
    vectors: DataFrame,
    previous: DataFrame,
    changed: DataFrame,
    k: int,
    index: LSHIndex,
    segments: Segments = (),
    block_size: int = 2048,
    block_rows: int = 25_000,
) -> DataFrame:
    """Incremental ``lsh`` top-``k``: update every list after some articles changed, without
    scoring all pairs again.

    With ``Δ`` the new or changed articles and ``R`` the removed ones (in ``previous`` but not
    in ``vectors``), an article is *affected* when it is in ``Δ``, its previous list holds a
    member of ``Δ ∪ R``, or its previous list was short (fewer than ``min(k, n - 1)``). Affected
    articles are searched again in full (their probed buckets against all members). Every other
    article keeps its list, merged with the members of ``Δ`` in its probed buckets. With the same
    ``index`` this equals ``top_k(vectors, k, index=index)``: an unaffected list lost nothing,
    and anything new in its buckets is in ``Δ``. Work is proportional to the affected articles
    and to the buckets ``Δ`` lands in, plus one assignment pass over all vectors.

    Args:
        vectors: the whole current catalogue, ``(article_id, vector)``.
        previous: the last result for these vectors' modality (:func:`top_k`'s columns).
        changed: ``article_id`` of every article whose vector is new or changed since then.
        k, segments, block_size, block_rows: as in :func:`top_k`.
        index: the hash functions ``previous`` was computed with.

    Returns:
        The new top-``k`` table of every article in ``vectors``, computed before the call
        returns (a local checkpoint, as :func:`top_k`).

    Raises:
        ValueError: as :func:`top_k`, or an index of another dimension.
    """
    if k < 1:
        raise ValueError(f"knn: k must be >= 1, got {k}")
    indexed, n, dim = prepare(vectors)
    cached = [indexed]
    try:
        if n < 2:
            return top_k(vectors, k, index=index, segments=segments)
        if index.dim != dim:
            raise ValueError(f"knn: the LSH index was fitted on {index.dim}-d vectors, these have {dim}")
        return _materialised(_update(indexed, n, dim, previous, changed, k, index, segments, block_size, block_rows,
                                     cached))
    finally:
        for df in cached:
            df.unpersist()


def _update(indexed: DataFrame, n: int, dim: int, previous: DataFrame, changed: DataFrame, k: int, index: LSHIndex,
            segments: Segments, block_size: int, block_rows: int, cached: list[DataFrame]) -> DataFrame:
    """The lists of :func:`update_top_k`, lazily; what it persists goes into ``cached``."""
    names = indexed.select("idx", "article_id")
    want = min(k, n - 1)
    delta = changed.select("article_id").distinct().join(names, "article_id").select("idx").persist()
    cached.append(delta)
    prev = previous.select("article_id", "neighbour_id", "score", "rank", *(["segment_scores"] if segments else []))
    # neighbours that changed (Δ) or left (not in vectors any more)
    stale = prev.join(delta.join(names, "idx").select(F.col("article_id").alias("neighbour_id")), "neighbour_id", "left_semi")
    gone = prev.join(names.select(F.col("article_id").alias("neighbour_id")), "neighbour_id", "left_anti")
    short = prev.groupBy("article_id").agg(F.count(F.lit(1)).alias("found")).where(F.col("found") < want)
    listed = prev.select("article_id").distinct()
    affected = (
        delta.unionByName(stale.select("article_id").unionByName(gone.select("article_id"))
                          .unionByName(short.select("article_id")).join(names, "article_id").select("idx"))
        .unionByName(names.join(listed, "article_id", "left_anti").select("idx"))  # no previous list at all
        .distinct()
        .persist()
    )
    rows = lsh_cell_rows(indexed, dim, index).persist()
    cached.extend([affected, rows])
    in_a = rows.join(affected.withColumn("a", F.lit(True)), "idx", "left").withColumn("a", F.coalesce("a", F.lit(False)))
    in_ad = in_a.join(delta.withColumn("d", F.lit(True)), "idx", "left").withColumn("d", F.coalesce("d", F.lit(False)))
    empty = F.array().cast("array<bigint>")
    params = index.params

    def restrict(homes: Any, probes: Any) -> DataFrame:
        cells = in_ad.select("grp", "idx", "vec", homes.alias("homes"), probes.alias("probes"))
        cells = cells.where((F.size("homes") > 0) | (F.size("probes") > 0))
        busy = cells.where(F.size("probes") > 0).select("grp").distinct()
        return cells.join(busy, "grp", "left_semi").select("grp", "idx", "vec", "homes", "probes")

    # affected articles: full search of their buckets
    full_rows = restrict(F.col("homes"), F.when(F.col("a"), F.col("probes")).otherwise(empty))
    full = merge_pairs(score_cell_rows(full_rows, dim, k, params.max_bucket_size, params.seed, block_size, segments),
                       k, segments)
    full = full.join(affected, "idx", "left_semi")
    # everyone else: previous list plus the changed members of their buckets
    new_rows = restrict(F.when(F.col("d"), F.col("homes")).otherwise(empty),
                        F.when(~F.col("a"), F.col("probes")).otherwise(empty))
    fresh = score_cell_rows(new_rows, dim, k, params.max_bucket_size, params.seed, block_size, segments)
    kept = (
        prev.join(names, "article_id")
        .join(affected, "idx", "left_anti")
        .join(names.select(F.col("article_id").alias("neighbour_id"), F.col("idx").alias("nidx")), "neighbour_id")
        .select("idx", "nidx", "score", *(["segment_scores"] if segments else []))
    )
    unaffected = merge_pairs(kept.unionByName(fresh.join(affected, "idx", "left_anti")), k, segments)
    ranked = _top_up(indexed, full.unionByName(unaffected), n, k, dim, segments, block_size, block_rows, cached)
    logger.info("lsh update: %d articles, %d changed, %d affected", n, delta.count(), affected.count())
    return _named(ranked, names, segments)


def recall_at_k(
    vectors: DataFrame, result: DataFrame, k: int, sample: int, seed: int = 7
) -> dict[str, float]:
    """recall@k of ``result`` against exact KNN on a sample of query articles.

    A returned neighbour is a hit when its exact score reaches the exact k-th score (minus
    1e-6), so a tie with the k-th neighbour counts; recall = hits / min(k, n - 1), averaged
    over the sampled queries (chosen by a hash of article_id and ``seed``; exact search runs
    distributed, see :func:`exact_pairs`).

    Returns:
        ``{"recall": r, "queries": q}``.
    """
    indexed, n, dim = prepare(vectors)
    queries = indexed.orderBy(F.xxhash64("article_id", F.lit(seed)), "article_id").limit(sample).persist()
    try:
        n_q = queries.count()
        if n_q == 0 or n < 2:
            return {"recall": float("nan"), "queries": float(n_q)}
        truth = exact_pairs(indexed, queries, k, dim, 2048, 25_000)
        names = indexed.select("idx", "article_id")
        kth = truth.groupBy("idx").agg(F.min("score").alias("kth"), F.count(F.lit(1)).alias("possible"))
        query_names = names.join(kth, "idx")
        found = result.join(query_names, "article_id").where(F.col("score") >= F.col("kth") - 1e-6)
        hits = found.groupBy("article_id").agg(F.count(F.lit(1)).alias("hits"))
        per_query = query_names.join(hits, "article_id", "left").select(
            (F.coalesce("hits", F.lit(0)) / F.col("possible")).alias("recall")
        )
        value = first_row(per_query.agg(F.avg("recall")))[0]
        return {"recall": float(value), "queries": float(n_q)}
    finally:
        queries.unpersist()
        indexed.unpersist()


def measure(started: float) -> float:
    """Seconds since ``started`` (``time.perf_counter()``), rounded to 0.01."""
    return round(time.perf_counter() - started, 2)
