"""Exact top-K on Spark: the query block × data block grid (the ground truth), and the exact
top-up of articles that LSH left short."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys.knn.arrow import CELL_ROW_SCHEMA, cell_batch, vectors_of
from recsys.knn.params import Segments
from recsys.knn.scoring import merge_pairs, partitions, score_cell_rows

logger = logging.getLogger(__name__)


def exact_cell_rows(data: DataFrame, queries: DataFrame | None, n: int, n_queries: int, dim: int,
                    block_rows: int) -> DataFrame:
    """Cell rows for exact search: query block × data block grid.

    ``data`` and ``queries`` are ``(idx, vector)``; ``queries=None`` means every data row is a
    query too. Block ``b`` of a side holds ``idx mod B``; cell ``(a, b)`` scores query block
    ``a`` against data block ``b``, so a data row is copied ``A`` times and a query row ``B``
    times. ``B = ceil(n / block_rows)`` (at least ``sqrt(partitions)`` so every core has cells).
    """
    min_blocks = max(1, math.isqrt(partitions(data)))
    d_blocks = max(min_blocks, math.ceil(n / block_rows))
    q_blocks = d_blocks if queries is None else max(1, math.ceil(n_queries / block_rows))

    def rows_for(batches: Iterator[pa.RecordBatch], as_data: bool, as_query: bool) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            idx = batch.column("idx").to_numpy()
            vec = vectors_of(batch.column("vec"), dim)
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
            yield cell_batch(c, idx[r], vec[r], home_off, c[h_any], probe_off, c[p_any])

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


def top_up(indexed: DataFrame, ranked: DataFrame, n: int, k: int, dim: int, segments: Segments,
            block_size: int, block_rows: int, cached: list[DataFrame], queries: DataFrame | None = None) -> DataFrame:
    """Exact search for the articles LSH left with fewer than ``min(k, n - 1)`` neighbours
    (among ``queries`` (``idx``) when given: the articles ``ranked`` is meant to list).

    Such articles share no bucket with enough others (outliers); :func:`exact_pairs` scans
    them against all vectors. A large share of them means the LSH parameters are too strict.
    What it persists is appended to ``cached``: the caller unpersists it once the returned
    lists are materialised.
    """
    ranked = ranked.persist()
    cached.append(ranked)
    want = min(k, n - 1)
    counts = ranked.groupBy("idx").agg(F.count(F.lit(1)).alias("found"))
    expected = indexed if queries is None else indexed.join(queries, "idx", "left_semi")
    short = (
        expected.select("idx", "vec")
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
