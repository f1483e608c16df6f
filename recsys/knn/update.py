"""Incremental top-K: update every list a change can affect, with a saved LSH index."""

from __future__ import annotations

import logging
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys.knn.exact import top_up
from recsys.knn.index import assign_cells
from recsys.knn.params import LSHIndex, Segments
from recsys.knn.scoring import materialised, merge_pairs, named, prepare, score_cell_rows
from recsys.knn.search import top_k

logger = logging.getLogger(__name__)


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
        return materialised(_update(indexed, n, dim, previous, changed, k, index, segments, block_size, block_rows,
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
    rows = assign_cells(indexed, dim, index).persist()
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
    ranked = top_up(indexed, full.unionByName(unaffected), n, k, dim, segments, block_size, block_rows, cached)
    logger.info("lsh update: %d articles, %d changed, %d affected", n, delta.count(), affected.count())
    return named(ranked, names, segments)
