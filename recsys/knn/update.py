"""Incremental top-K: rewrite only the lists a change alters, with a saved LSH index.

Scoring goes to the vectors, never the vectors to a shuffle: the few queries that need a new
search (and the changed vectors, as candidates) travel with the tasks, each task scores them
against its own partition of the catalogue bucket by bucket, and only candidate pairs are
shuffled. Unchanged lists are neither read into the search nor written back.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType, IntegerType, StringType, StructField, StructType

from recsys.knn.arrow import list_column, pair_schema, pairs_batch, task_threads, vectors_of
from recsys.knn.exact import top_up
from recsys.knn.index import cell_keys, largest_bucket, probed_cells
from recsys.knn.kernels import CellResult, merge_top_k, pair_segment_cosines, score_cells
from recsys.knn.params import LSHIndex, Segments
from recsys.knn.scoring import collect_prepared, materialised, merge_pairs, named, per_core, prepare
from recsys.knn.search import top_k

logger = logging.getLogger(__name__)

SHIPPED_BYTES = 64 << 20  # at most this many bytes of query vectors, and as many of changed ones, travel with one pass
NO_WINDOW = 1 << 62  # score_cells: never cut a bucket into windows (the update checks bucket sizes first)
SEARCHED, ENTERING = 0, 1  # the kinds of pairs of one shipped pass (:func:`_shipped_pass`)
# top_k's columns, for lists computed on the driver
LISTS_SCHEMA = StructType([
    StructField("article_id", StringType(), False), StructField("rank", IntegerType(), False),
    StructField("neighbour_id", StringType(), False), StructField("score", FloatType(), False),
    StructField("segment_scores", ArrayType(FloatType(), False), True),
])


@dataclass(frozen=True)
class ListUpdate:
    """What :func:`update_top_k` changed.

    Attributes:
        lists: the new top-K rows (``top_k``'s columns) of every *rewritten* article; computed
            (a local checkpoint).
        replaced: ``article_id`` of every article whose previous rows are superseded: the
            rewritten ones and the removed ones (whose lists are gone); computed.
        full: True when the update fell back to a full search (then ``lists`` holds every list).
        affected, touched, removed: articles searched again, unchanged lists a changed vector
            entered, articles removed.
        articles: the vectors (articles) of the catalogue.
        largest_bucket: members of the largest home bucket, None when ``bucket_bound`` showed
            that no bucket can be too large (not measured).
    """

    lists: DataFrame
    replaced: DataFrame
    full: bool
    affected: int
    touched: int
    removed: int
    articles: int
    largest_bucket: int | None = None

    def applied(self, previous: DataFrame) -> DataFrame:
        """The whole new table: ``previous`` without the replaced lists, plus the new ones."""
        kept = previous.join(self.replaced, "article_id", "left_anti")
        columns = [F.col(c) if c in kept.columns else F.lit(None).cast(self.lists.schema[c].dataType).alias(c)
                   for c in self.lists.columns]
        return kept.select(*columns).unionByName(self.lists)


def update_top_k(
    vectors: DataFrame,
    previous: DataFrame,
    changed: DataFrame,
    k: int,
    index: LSHIndex,
    segments: Segments = (),
    block_size: int = 2048,
    block_rows: int = 25_000,
    max_affected_share: float = 0.3,
    bucket_bound: int | None = None,
    on_driver: bool = False,
) -> ListUpdate:
    """Incremental ``lsh`` top-``k``: rewrite only the lists a change alters.

    With ``Δ`` the new or changed vectors and ``R`` the removed articles (listed in ``previous``
    but not in ``vectors``), an article is *affected* when it is in ``Δ``, its previous list
    holds a member of ``Δ ∪ R``, or the list was short (fewer than ``min(k, n - 1)``) or missing.
    Affected articles are searched again (their probed buckets against all members). Any other
    list lost nothing, and the only new candidates in its buckets are members of ``Δ``: its new
    list is the old one merged with the ``Δ`` members of its probed buckets that beat its ``k``-th
    entry (score, then ``article_id``); a list no such member beats is left as it is (*untouched*).
    With the same ``index`` the result equals ``top_k(vectors, k, index=index)`` (up to the
    float32 rounding of scores computed in other blocks).

    How: the affected queries (with their probed buckets) and ``Δ`` (with its home buckets)
    are shipped together with the tasks, in chunks of at most :data:`SHIPPED_BYTES` of each;
    each task scores its partition of the catalogue against both bucket by bucket
    (:func:`recsys.knn.kernels.score_cells`) and returns only candidate pairs, so no vector is
    shuffled. Work: one pass over the vectors per chunk, ``O(|affected| · probes · bucket size)``
    products plus ``O(n · probes)`` for the buckets of the unaffected articles.

    Falls back to a full search with ``index`` (``full`` in the result) when more than
    ``max_affected_share`` of the articles are affected (a full search is then cheaper), or when
    a bucket holds more than ``max_bucket_size`` members (a full search cuts such buckets into
    windows that depend on every member). Measuring the buckets is a pass over every vector;
    it is skipped when ``bucket_bound`` (an upper bound on the largest bucket, e.g.
    :meth:`recsys.knn.index.SavedIndex.bucket_bound`) is at most ``max_bucket_size``.

    Args:
        vectors: the whole current catalogue, ``(article_id, vector)``.
        previous: the last result for these vectors' modality (:func:`top_k`'s columns).
        changed: ``article_id`` of every article whose vector is new or changed since then.
        k, segments, block_size, block_rows: as in :func:`top_k`.
        index: the hash functions ``previous`` was computed with.
        max_affected_share: the share of affected articles above which a full search runs.
        bucket_bound: None, or an upper bound on the members of the largest home bucket.
        on_driver: compute the update on the driver (:func:`_update_on_driver`, the same
            result): the vectors (``n × d × 4`` bytes) and the previous lists are collected, so
            only for a catalogue that fits in the driver's memory and ``spark.driver.maxResultSize``.

    Returns:
        A :class:`ListUpdate`.

    Raises:
        ValueError: as :func:`top_k`, or an index of another dimension.
    """
    if k < 1:
        raise ValueError(f"knn: k must be >= 1, got {k}")
    if on_driver:
        return _update_on_driver(vectors, previous, changed, k, index, segments, block_size, block_rows,
                                 max_affected_share, bucket_bound)
    indexed, n, dim = prepare(vectors)
    cached = [indexed]
    try:
        if index.dim != dim and n > 0:
            raise ValueError(f"knn: the LSH index was fitted on {index.dim}-d vectors, these have {dim}")
        return _update(vectors, indexed, n, dim, previous, changed, k, index, segments, block_size, block_rows,
                       max_affected_share, bucket_bound, cached)
    finally:
        for df in cached:
            df.unpersist()


def _update(vectors: DataFrame, indexed: DataFrame, n: int, dim: int, previous: DataFrame, changed: DataFrame, k: int, index: LSHIndex,
            segments: Segments, block_size: int, block_rows: int, max_affected_share: float,
            bucket_bound: int | None, cached: list[DataFrame]) -> ListUpdate:
    """:func:`update_top_k` once the vectors are prepared; what it persists goes into ``cached``."""
    names = indexed.select("idx", "article_id")
    want = min(k, n - 1)
    seg_cols = ["segment_scores"] if segments else []
    prev = previous.select("article_id", "neighbour_id", "score", "rank", *seg_cols)
    removed = prev.select("article_id").distinct().join(names, "article_id", "left_anti").persist()
    cached.append(removed)
    n_removed = removed.count()

    biggest: int | None = None

    def full_search(reason: str, affected: int) -> ListUpdate:
        logger.info("lsh update: %s; full search with the saved index", reason)
        lists = top_k(vectors, k, index=index, segments=segments, block_size=block_size, block_rows=block_rows)
        replaced = materialised(prev.select("article_id").distinct().unionByName(names.select("article_id")).distinct())
        return ListUpdate(lists, replaced, True, affected, 0, n_removed, n, biggest)

    if n < 2:
        return full_search("fewer than two vectors", n)
    if bucket_bound is None or bucket_bound > index.params.max_bucket_size:
        biggest = largest_bucket(indexed, dim, index)
        if biggest > index.params.max_bucket_size:
            return full_search(f"a bucket holds {biggest} members (max_bucket_size {index.params.max_bucket_size})", n)
    delta = changed.select("article_id").distinct().join(names, "article_id").select("idx").persist()
    cached.append(delta)
    # previous rows by idx; a neighbour no longer in the catalogue has a null nidx
    by_idx = (
        prev.join(names, "article_id")
        .join(names.select(F.col("article_id").alias("neighbour_id"), F.col("idx").alias("nidx")), "neighbour_id", "left")
        .select("idx", "nidx", "score", "rank", *seg_cols)
        .persist()
    )
    cached.append(by_idx)
    stale = by_idx.where(F.col("nidx").isNull()).select("idx").unionByName(
        by_idx.join(delta.select(F.col("idx").alias("nidx")), "nidx", "left_semi").select("idx"))
    counts = by_idx.groupBy("idx").agg(F.count(F.lit(1)).alias("found"))
    short = counts.where(F.col("found") < want).select("idx")
    unlisted = names.select("idx").join(counts, "idx", "left_anti")
    affected = delta.unionByName(stale).unionByName(short).unionByName(unlisted).distinct().persist()
    cached.append(affected)
    n_affected = affected.count()
    if n_affected > max_affected_share * n:
        return full_search(f"{n_affected} of {n} lists affected (more than {max_affected_share:.0%})", n_affected)

    # one pass over the vectors for both kinds of candidates: (1) the affected articles' probed
    # buckets against every member; (2) for every other list, the members of Δ in its probed
    # buckets that beat its k-th entry
    bars = (by_idx.where(F.col("rank") == want).join(affected, "idx", "left_anti")
            .select("idx", F.col("score").alias("bar"), F.col("nidx").alias("bar_nidx")))
    both = _shipped_pass(indexed, affected, delta, bars, dim, k, index, segments, block_size).persist()
    cached.append(both)
    ranked = merge_pairs(both.where(F.col("kind") == SEARCHED).drop("kind"), k, segments)
    ranked = top_up(indexed, ranked, n, k, dim, segments, block_size, block_rows, cached, queries=affected)
    entering = both.where(F.col("kind") == ENTERING).drop("kind")
    touched = entering.select("idx").distinct().persist()
    cached.append(touched)
    n_touched = touched.count()
    kept = by_idx.join(touched, "idx", "left_semi").select("idx", "nidx", "score", *seg_cols)
    merged = merge_pairs(kept.unionByName(entering), k, segments)
    lists = materialised(named(ranked.unionByName(merged.select(*ranked.columns)), names, segments))
    rewritten = affected.unionByName(touched).join(names, "idx").select("article_id")
    replaced = materialised(rewritten.unionByName(removed).distinct())
    logger.info("lsh update: %d articles, %d changed, %d removed, %d searched again, %d lists entered by a changed "
                "vector", n, delta.count(), n_removed, n_affected, n_touched)
    return ListUpdate(lists, replaced, False, n_affected, n_touched, n_removed, n, biggest)


def _update_on_driver(vectors: DataFrame, previous: DataFrame, changed: DataFrame, k: int, index: LSHIndex,
                      segments: Segments, block_size: int, block_rows: int, max_affected_share: float,
                      bucket_bound: int | None) -> ListUpdate:
    """:func:`update_top_k` with the catalogue's vectors and previous lists on the driver.

    The same algorithm and kernels as the distributed update, the whole catalogue one
    partition of :func:`_partition_pairs`: what costs the distributed update most on a
    catalogue that fits in the driver (about 20 Spark jobs: ranking the ids, joins that find
    the affected lists, checkpoints, shuffles of candidate pairs) becomes array operations.
    The new lists come back as a local checkpoint of the driver's arrays. Falls back to the same full search
    (on Spark) as the distributed update.
    """
    spark = vectors.sparkSession
    names, vec = collect_prepared(vectors)
    n = len(names)
    if n and index.dim != vec.shape[1]:
        raise ValueError(f"knn: the LSH index was fitted on {index.dim}-d vectors, these have {vec.shape[1]}")
    seg_cols = ["segment_scores"] if segments else []
    prev = previous.select("article_id", "neighbour_id", "score", "rank", *seg_cols).toArrow().combine_chunks()
    p_articles = prev.column("article_id").chunk(0) if prev.num_rows else pa.array([], pa.string())
    listed = pc.unique(p_articles)
    removed = listed.filter(pc.invert(pc.is_in(listed, value_set=names)))
    want = min(k, n - 1)
    biggest: int | None = None

    def full_search(reason: str, affected: int) -> ListUpdate:
        logger.info("lsh update: %s; full search with the saved index", reason)
        lists = top_k(vectors, k, index=index, segments=segments, block_size=block_size, block_rows=block_rows)
        replaced = _id_frame(spark, pc.unique(pa.concat_arrays([listed, names])))
        return ListUpdate(lists, replaced, True, affected, 0, len(removed), n, biggest)

    if n < 2:
        return full_search("fewer than two vectors", n)
    if bucket_bound is None or bucket_bound > index.params.max_bucket_size:
        biggest = int(np.unique(cell_keys(probed_cells(vec, index, 1)[:, :, 0]), return_counts=True)[1].max())
        if biggest > index.params.max_bucket_size:
            return full_search(f"a bucket holds {biggest} members (max_bucket_size {index.params.max_bucket_size})", n)
    delta = np.unique(_positions(changed.select("article_id").toArrow().column(0), names).astype(np.int64))
    # previous rows by idx (those of removed articles left out); a neighbour no longer in the
    # catalogue has nidx -1
    p_idx = pc.index_in(p_articles, value_set=names).fill_null(-1).to_numpy().astype(np.int64)
    current = p_idx >= 0
    b_idx = p_idx[current]
    b_nidx = pc.index_in(prev.column("neighbour_id").chunk(0) if prev.num_rows else pa.array([], pa.string()),
                         value_set=names).fill_null(-1).to_numpy()[current].astype(np.int64)
    b_score = prev.column("score").to_numpy()[current].astype(np.float32)
    b_rank = prev.column("rank").to_numpy()[current]
    b_seg = (prev.column("segment_scores").chunk(0).flatten().to_numpy(zero_copy_only=False)
             .astype(np.float32).reshape(prev.num_rows, len(segments))[current] if segments and prev.num_rows
             else np.zeros((len(b_idx), len(segments)), np.float32) if segments else None)
    stale = b_idx[(b_nidx < 0) | np.isin(b_nidx, delta)]
    short = np.flatnonzero(np.bincount(b_idx, minlength=n) < want)  # short lists and missing ones
    affected = np.unique(np.concatenate([delta, stale, short]))
    if len(affected) > max_affected_share * n:
        return full_search(f"{len(affected)} of {n} lists affected (more than {max_affected_share:.0%})",
                           len(affected))

    # every unaffected list's k-th entry, the bar a changed vector must beat to enter it
    unaffected = np.ones(n, bool)
    unaffected[affected] = False
    at_bar = (b_rank == want) & unaffected[b_idx]
    has_bar = np.zeros(n, bool)
    bar, bar_nidx = np.full(n, np.inf, np.float32), np.full(n, -1, np.int64)
    has_bar[b_idx[at_bar]], bar[b_idx[at_bar]], bar_nidx[b_idx[at_bar]] = True, b_score[at_bar], b_nidx[at_bar]
    q_vec, d_vec = vec[affected], vec[delta]
    queries = _Shipped(affected, q_vec, cell_keys(probed_cells(q_vec, index)).reshape(len(affected), -1))
    entering = _Shipped(delta, d_vec, cell_keys(probed_cells(d_vec, index, 1)[:, :, 0]))
    ids = np.arange(n, dtype=np.int64)
    found: dict[int, list[_Pairs]] = {SEARCHED: [], ENTERING: []}
    for kind, i, j, score, seg in _partition_pairs(queries, entering, ids, vec, has_bar, bar, bar_nidx, k, index,
                                                   segments, block_size):
        found[kind].append(_Pairs(i, j, score, seg))
    n_seg = len(segments) if segments else None
    searched = _Pairs.joined(found[SEARCHED], n_seg)
    # affected lists the buckets left short (outliers): an exact search against every vector
    got = np.bincount(searched.idx, minlength=n)
    lacking = affected[got[affected] < want]
    if len(lacking):
        logger.info("lsh update: %d searched articles had fewer than %d candidates; exact search for them",
                    len(lacking), want)
        result = score_cells(vec, ids, (ids, np.zeros(n, np.int64)), (lacking, np.zeros(len(lacking), np.int64)),
                             k, NO_WINDOW, np.zeros(n, np.float32), block_size)
        exact = _Pairs(result.rows, result.cols, result.scores,
                       pair_segment_cosines(vec, result.rows, result.cols, segments) if segments else None)
        searched = _Pairs.joined([searched.where(~np.isin(searched.idx, lacking)), exact], n_seg)
    # lists a changed vector entered: the old list and the entering vectors, merged
    entered = _Pairs.joined(found[ENTERING], n_seg)
    touched = np.unique(entered.idx)
    kept = np.isin(b_idx, touched)
    merged = _Pairs.joined([_Pairs(b_idx[kept], b_nidx[kept], b_score[kept], None if b_seg is None else b_seg[kept]),
                            entered], n_seg)
    lists = _Pairs.joined([searched.ranked(k), merged.ranked(k)], n_seg)
    rewritten = names.take(pa.array(np.unique(np.concatenate([affected, touched]))))
    logger.info("lsh update (on the driver): %d articles, %d changed, %d removed, %d searched again, %d lists "
                "entered by a changed vector", n, len(delta), len(removed), len(affected), len(touched))
    return ListUpdate(_lists_frame(spark, lists, names), _id_frame(spark, pa.concat_arrays([rewritten, removed])),
                      False, len(affected), len(touched), len(removed), n, biggest)


def _positions(articles: pa.ChunkedArray | pa.Array, names: pa.Array) -> np.ndarray:
    """Positions in ``names`` of the ``articles`` that are in it (int64, others left out)."""
    if isinstance(articles, pa.ChunkedArray):
        articles = articles.combine_chunks() if articles.num_chunks else pa.array([], pa.string())
    return pc.index_in(articles, value_set=names).drop_null().to_numpy().astype(np.int64)


@dataclass(frozen=True)
class _Pairs:
    """Candidate pairs on the driver: ``idx, nidx`` int64, ``score`` float32, ``seg``
    ``(p, segments)`` float32 or None, and ``rank`` once ranked."""

    idx: np.ndarray
    nidx: np.ndarray
    score: np.ndarray
    seg: np.ndarray | None
    rank: np.ndarray | None = None

    @staticmethod
    def joined(parts: list[_Pairs], n_seg: int | None) -> _Pairs:
        parts = [p for p in parts if len(p.idx)]
        empty = np.zeros(0, np.int64)
        seg = None if n_seg is None else np.concatenate(
            [np.zeros((0, n_seg), np.float32), *[p.seg for p in parts if p.seg is not None]])
        ranks = [p.rank for p in parts]
        return _Pairs(np.concatenate([empty, *[p.idx for p in parts]]), np.concatenate([empty, *[p.nidx for p in parts]]),
                      np.concatenate([np.zeros(0, np.float32), *[p.score for p in parts]]), seg,
                      np.concatenate([np.zeros(0, np.int32), *ranks]) if parts and all(r is not None for r in ranks)
                      else None)

    def where(self, mask: np.ndarray) -> _Pairs:
        return _Pairs(self.idx[mask], self.nidx[mask], self.score[mask], None if self.seg is None else self.seg[mask],
                      None if self.rank is None else self.rank[mask])

    def ranked(self, k: int) -> _Pairs:
        """Each idx's best ``k`` (:func:`merge_top_k`: a duplicate pair counts once), with ranks."""
        keep, rank = merge_top_k(self.idx, self.nidx, self.score, k)
        taken = self.where(keep)
        return _Pairs(taken.idx, taken.nidx, taken.score, taken.seg, rank)


def _lists_frame(spark: SparkSession, lists: _Pairs, names: pa.Array) -> DataFrame:
    """Ranked pairs → a DataFrame of :func:`top_k`'s columns, computed once (a local checkpoint:
    the stage reads it twice, to write and to measure, and local Arrow data would be converted
    to rows again on each read; 26 → 20 s of write, 13 → 9 s of measures on the H&M update day)."""
    n_seg = 0 if lists.seg is None else lists.seg.shape[1]
    seg = (list_column(np.arange(len(lists.idx) + 1) * n_seg, lists.seg.ravel(), pa.float32())
           if lists.seg is not None else pa.nulls(len(lists.idx), pa.list_(pa.float32())))
    rank = lists.rank if lists.rank is not None else np.zeros(0, np.int32)
    table = pa.table({"article_id": names.take(pa.array(lists.idx)), "rank": pa.array(rank, pa.int32()),
                      "neighbour_id": names.take(pa.array(lists.nidx)), "score": pa.array(lists.score, pa.float32()),
                      "segment_scores": seg})
    return materialised(spark.createDataFrame(table, LISTS_SCHEMA))


def _id_frame(spark: SparkSession, articles: pa.Array) -> DataFrame:
    return spark.createDataFrame(pa.table({"article_id": articles.cast(pa.string())}), "article_id string")


def _collected(rows: DataFrame, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(idx (m,) int64, vectors (m, d) float32)`` of a small prepared frame, on the driver."""
    table = rows.select("idx", "vec").toArrow()
    if table.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    return table.column("idx").to_numpy(), vectors_of(table.column("vec").combine_chunks(), dim)


def _chunks(m: int, dim: int) -> list[slice]:
    step = max(1, SHIPPED_BYTES // max(1, dim * 4))
    return [slice(i, i + step) for i in range(0, m, step)] or [slice(0, 0)]


def _shipped_pass(indexed: DataFrame, queries: DataFrame, delta: DataFrame, bars: DataFrame, dim: int, k: int,
                  index: LSHIndex, segments: Segments, block_size: int) -> DataFrame:
    """Both kinds of candidate pairs of an update, in one pass over the vectors
    (``pair_schema(segments)`` plus ``kind``):

    - :data:`SEARCHED`: ``queries`` (``idx``) against every vector in their probed buckets, each
      query's best ``k`` per task (merge them with :func:`merge_pairs`);
    - :data:`ENTERING`: ``(idx, nidx ∈ delta, score)`` where a changed vector ``nidx`` is in a
      probed bucket of an article with a ``bars`` row (``idx, bar, bar_nidx``: the unaffected
      articles and their ``k``-th entry) and beats that entry.

    ``delta`` must be a subset of ``queries`` (its vectors are taken from theirs). The queries
    (with their probed bucket keys) and the changed vectors (with their home bucket keys) travel
    with the tasks, at most :data:`SHIPPED_BYTES` of each per pass; ``bars`` is broadcast (one
    small row per article).
    """
    q_idx, q_vec = _collected(indexed.join(queries, "idx", "left_semi"), dim)
    q_keys = cell_keys(probed_cells(q_vec, index)).reshape(len(q_idx), -1)
    d_ids = delta.toArrow().column("idx").to_numpy()
    in_delta = np.isin(q_idx, d_ids)
    d_idx, d_vec = q_idx[in_delta], q_vec[in_delta]
    d_keys = cell_keys(probed_cells(d_vec, index, 1)[:, :, 0])  # (m, bands): home buckets
    rows = per_core(indexed.select("idx", "vec").join(F.broadcast(bars), "idx", "left"))
    schema = StructType([*pair_schema(segments).fields, StructField("kind", IntegerType(), False)])
    none = slice(0, 0)
    return _union([
        rows.mapInArrow(_scorer(_Shipped(q_idx[qc], q_vec[qc], q_keys[qc]), _Shipped(d_idx[dc], d_vec[dc], d_keys[dc]),  # type: ignore[arg-type]
                                dim, k, index, segments, block_size), schema)
        for qc, dc in itertools.zip_longest(_chunks(len(q_idx), dim), _chunks(len(d_idx), dim), fillvalue=none)
    ])


def _union(parts: list[DataFrame]) -> DataFrame:
    out = parts[0]
    for part in parts[1:]:
        out = out.unionByName(part)
    return out


@dataclass(frozen=True)
class _Shipped:
    """Rows that travel with a pass: ``idx (m,)``, vectors ``(m, d)`` and bucket keys ``(m, c)``."""

    idx: np.ndarray
    vec: np.ndarray
    keys: np.ndarray


def _scorer(queries: _Shipped, changed: _Shipped, dim: int, k: int, index: LSHIndex, segments: Segments,
            block_size: int) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The task function of :func:`_shipped_pass`: the task's partition (``idx, vec, bar,
    bar_nidx``) through :func:`_partition_pairs`, as Arrow batches (``kind`` last)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        task_threads()
        tables = [b for b in batches if b.num_rows]
        if not tables:
            return
        table = pa.Table.from_batches(tables).combine_chunks()
        pairs = _partition_pairs(queries, changed, table.column("idx").to_numpy(),
                                 vectors_of(table.column("vec").chunk(0), dim),
                                 table.column("bar").is_valid().to_numpy(zero_copy_only=False),
                                 table.column("bar").fill_null(np.inf).to_numpy().astype(np.float32),
                                 table.column("bar_nidx").fill_null(-1).to_numpy(), k, index, segments, block_size)
        for kind, idx, nidx, scores, seg in pairs:
            batch = pairs_batch(idx, nidx, scores, seg)
            yield pa.RecordBatch.from_arrays([*batch.columns, pa.array(np.full(len(idx), kind, np.int32))],
                                             names=[*batch.schema.names, "kind"])

    return run


def _partition_pairs(queries: _Shipped, changed: _Shipped, p_idx: np.ndarray, p_vec: np.ndarray,
                     has_bar: np.ndarray, bar: np.ndarray, bar_nidx: np.ndarray, k: int, index: LSHIndex,
                     segments: Segments, block_size: int
                     ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
    """Both kinds of candidate pairs between a partition of the catalogue and the shipped rows.

    The partition (``p_idx (m,)`` int64, ``p_vec (m, d)`` float32, and per row ``has_bar``,
    ``bar`` float32, ``bar_nidx`` int64: an unaffected list's ``k``-th entry) is the data side
    of the shipped ``queries`` (its rows' home buckets) and the query side of the shipped
    ``changed`` vectors (its rows with a bar, their probed buckets). Its buckets are computed
    once for both; each side is scored in one :func:`score_cells` call over the whole
    partition.

    Yields:
        ``(kind, idx, nidx, score, segment_scores)``: :data:`SEARCHED` pairs (each query's best
        ``k`` in this partition) and :data:`ENTERING` pairs (only those that beat the bar, each
        list's best ``k``); ``segment_scores`` ``(p, segments)`` float32, or None without segments.
    """
    m_q, m_d = len(queries.idx), len(changed.idx)
    # with several bands a pair can meet in more than one: score_cells must then drop duplicates
    unique = int(index.fitted["bands"]) == 1
    # rows: the shipped queries, then the shipped changed vectors, then the partition
    vec = np.concatenate([queries.vec, changed.vec, p_vec])
    ids = np.concatenate([queries.idx, changed.idx, p_idx])
    del p_vec  # the Spark task passes its only copy: freed once concatenated
    first = m_q + m_d
    own = np.arange(first, len(ids))
    entering = m_d > 0 and bool(has_bar.any())
    cells = probed_cells(vec[first:], index, None if entering else 1)  # (rows, bands, probes); [:, :, 0] home
    zeros = np.zeros(len(vec), np.float32)

    def emitted(result: CellResult, beats: np.ndarray | None, kind: int
                ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
        rows, cols, scores = result.rows, result.cols, result.scores
        if beats is not None:
            rows, cols, scores = rows[beats], cols[beats], scores[beats]
        if len(rows) == 0:
            return
        keep, _ = merge_top_k(ids[rows], ids[cols], scores, k)
        rows, cols, scores = rows[keep], cols[keep], scores[keep]
        seg = pair_segment_cosines(vec, rows, cols, segments) if segments else None
        yield kind, ids[rows], ids[cols], scores, seg

    if m_q:  # partition rows are data: their home buckets
        homes = cell_keys(cells[:, :, 0])
        result = score_cells(vec, ids, (np.repeat(own, homes.shape[1]), homes.ravel()),
                             (np.repeat(np.arange(m_q), queries.keys.shape[1]), queries.keys.ravel()),
                             k, NO_WINDOW, zeros, block_size, unique=unique)
        yield from emitted(result, None, SEARCHED)
    if entering:  # partition rows with a bar are queries: their probed buckets
        asking = own[has_bar]
        probes = cell_keys(cells[has_bar]).reshape(len(asking), -1)
        result = score_cells(vec, ids, (m_q + np.repeat(np.arange(m_d), changed.keys.shape[1]), changed.keys.ravel()),
                             (np.repeat(asking, probes.shape[1]), probes.ravel()),
                             k, NO_WINDOW, zeros, block_size, unique=unique)
        q = result.rows - first
        beats = (result.scores > bar[q]) | ((result.scores == bar[q]) & (ids[result.cols] < bar_nidx[q]))
        yield from emitted(result, beats, ENTERING)
