"""Top-K of every article with one of the backends (:func:`top_k`)."""

from __future__ import annotations

import logging
from typing import Any

from pyspark.sql import DataFrame

from recsys.knn.arrow import pair_schema
from recsys.knn.exact import exact_pairs, top_up
from recsys.knn.index import assign_cells, fit_hash
from recsys.knn.params import LSHIndex, LSHParams, Segments
from recsys.knn.scoring import materialised, merge_pairs, named, prepare, score_cell_rows, with_segment_scores

logger = logging.getLogger(__name__)


BACKENDS = ("lsh", "exact", "mllib")


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
        mllib: :class:`recsys.knn.mllib.MLlibParams` for the ``mllib`` backend.
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
            from recsys.knn.mllib import MLlibParams, mllib_pairs

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
            pairs = score_cell_rows(assign_cells(indexed, dim, index), dim, k, resolved.max_bucket_size,
                                    resolved.seed, block_size, segments)
            ranked = top_up(indexed, merge_pairs(pairs, k, segments), n, k, dim, segments, block_size, block_rows,
                             cached)
        return materialised(named(ranked, indexed.select("idx", "article_id"), segments))
    finally:
        for df in cached:
            df.unpersist()
