"""Distributed scoring shared by every backend: validate and key the vectors (:func:`prepare`),
score shuffled cell rows group by group (:func:`score_cell_rows`), merge candidate pairs into the
global top-K (:func:`merge_pairs`), and name the result."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema

from recsys.knn.arrow import (
    PREPARED_SCHEMA,
    VECTOR_NONFINITE,
    VECTOR_NULL,
    VECTOR_ZERO,
    pair_schema,
    pairs_batch,
    prepare_batches,
    task_threads,
    vectors_of,
)
from recsys.knn.kernels import merge_top_k, pair_segment_cosines, score_cells, segment_cosines
from recsys.knn.params import Segments
from recsys.tables import first_row


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
    # the ranks computed once and cached: Spark then knows their true size (a few MB per 100k
    # ids) and broadcasts them into the join below, instead of shuffling every vector to them
    # (a plan estimate counts them as large as the vectors); above the broadcast threshold the
    # join shuffles as before
    ranks = _cached(ids.withColumn("idx", F.row_number().over(Window.orderBy("article_id")).cast("long") - 1))
    try:
        ranks.count()
        keyed = vectors.select("article_id", "vector").join(ranks, "article_id", "left")
        keyed = keyed.withColumn("idx", F.coalesce("idx", F.lit(-1).cast("long")))
        prepared = _cached(keyed.select("article_id", "idx", "vector").mapInArrow(prepare_batches, PREPARED_SCHEMA))  # type: ignore[arg-type]
        try:
            stats = _prepared_stats(prepared)
        except BaseException:
            prepared.unpersist()
            raise
    finally:
        ranks.unpersist()
    if stats["n"] == 0:
        return prepared, 0, 0
    problem = prepared_problem(stats)
    if problem:
        prepared.unpersist()
        raise ValueError(f"knn: {problem}")
    return prepared, int(stats["n"]), int(stats["lo"])


def prepared_problem(stats: Any) -> str | None:
    """What is wrong with a non-empty set of prepared vectors, from their counts (``stats``:
    a Row or mapping with :func:`_prepared_stats`' fields), or None: rows without an
    article_id, null vectors, duplicate article_ids, vectors of different lengths, NaN/inf or
    null elements, or a zero vector, naming how many and one article_id."""
    if stats["no_id"]:
        return f"{stats['no_id']} row(s) have no article_id"
    if stats[f"n{VECTOR_NULL}"]:
        return f"{stats[f'n{VECTOR_NULL}']} article(s) have a null vector, e.g. article_id {stats[f'id{VECTOR_NULL}']}"
    if stats["ids"] != stats["n"]:
        return f"{stats['n'] - stats['ids']} duplicate article_id row(s); one vector per article"
    if stats["lo"] != stats["hi"]:
        return f"vectors have different lengths ({stats['lo']}..{stats['hi']})"
    if stats[f"n{VECTOR_NONFINITE}"]:
        return (f"{stats[f'n{VECTOR_NONFINITE}']} vector(s) hold NaN, inf or null, "
                f"e.g. article_id {stats[f'id{VECTOR_NONFINITE}']}")
    if stats[f"n{VECTOR_ZERO}"]:
        return (f"{stats[f'n{VECTOR_ZERO}']} zero vector(s) have no direction, "
                f"e.g. article_id {stats[f'id{VECTOR_ZERO}']}")
    return None


def collect_prepared(vectors: DataFrame) -> tuple[pa.Array, np.ndarray]:
    """:func:`prepare` on the driver: validate ``(article_id, vector)`` and bring it to the
    driver, ordered by ``article_id`` (row ``i`` is ``idx`` ``i`` of :func:`prepare`).

    The driver receives the vectors as Arrow lists (``n × d × 4`` bytes and the offsets:
    ``spark.driver.maxResultSize`` must allow them) and checks and converts them itself
    (:func:`recsys.knn.arrow.prepare_batches`): on the H&M fused vectors (99,630 × 1,396) 7.6-8.0 s
    against 10.8-11.5 s when the tasks converted them to float32 bytes first.

    Returns:
        ``(article_ids, vectors)``: ``(n,)`` Arrow strings in ascending (byte) order, and
        ``(n, d)`` float32 (``(0, 0)`` when there are none).

    Raises:
        ValueError: as :func:`prepare`, with the same messages.
    """
    import pyarrow.compute as pc

    keyed = vectors.select("article_id", F.lit(-1).cast("long").alias("idx"), "vector").toArrow()
    batches = list(prepare_batches(iter(keyed.to_batches())))
    del keyed
    if not batches:
        return pa.array([], pa.string()), np.zeros((0, 0), np.float32)
    table = pa.Table.from_batches(batches)
    ids, flag, dim = (table.column(c).combine_chunks() for c in ("article_id", "flag", "dim"))
    flags = flag.to_numpy()
    dims = dim.to_numpy()[flags != VECTOR_NULL]
    stats: dict[str, Any] = {
        "n": table.num_rows, "no_id": ids.null_count, "ids": pc.count_distinct(ids).as_py(),
        "lo": int(dims.min()) if len(dims) else None, "hi": int(dims.max()) if len(dims) else None,
    }
    for code in (VECTOR_NULL, VECTOR_NONFINITE, VECTOR_ZERO):
        these = pc.filter(ids, pa.array(flags == code))
        stats[f"n{code}"] = int((flags == code).sum())
        stats[f"id{code}"] = pc.min(these).as_py() if len(these) else None
    problem = prepared_problem(stats)
    if problem:
        raise ValueError(f"knn: {problem}")
    order = pc.sort_indices(ids).to_numpy()
    vec = vectors_of(table.column("vec").combine_chunks(), int(stats["lo"]))[order]
    return ids.take(pa.array(order)), vec


def _cached(df: DataFrame) -> DataFrame:
    """``df`` persisted under a private marker, which keeps this cache entry apart from other
    callers' identical plans, so their unpersist cannot drop it."""
    return df.withColumn("_cache", F.lit(uuid.uuid4().hex)).drop("_cache").persist()


def _prepared_stats(prepared: DataFrame) -> Any:
    """Counts of :func:`prepare`'s problems, in one pass (a Row)."""
    flag = F.col("flag")

    def first_with(code: int) -> Any:
        return F.min(F.when(flag == code, F.col("article_id")))

    return first_row(prepared.agg(
        F.count(F.lit(1)).alias("n"),
        F.count(F.when(F.col("idx") < 0, 1)).alias("no_id"),
        (F.max("idx") + 1).alias("ids"),  # idx ranks the distinct ids: no second shuffle for countDistinct
        F.min(F.when(flag != VECTOR_NULL, F.col("dim"))).alias("lo"),
        F.max(F.when(flag != VECTOR_NULL, F.col("dim"))).alias("hi"),
        *[F.count(F.when(flag == code, 1)).alias(f"n{code}") for code in (VECTOR_NULL, VECTOR_NONFINITE, VECTOR_ZERO)],
        *[first_with(code).alias(f"id{code}") for code in (VECTOR_NULL, VECTOR_NONFINITE, VECTOR_ZERO)],
    ))


def per_core(rows: DataFrame) -> DataFrame:
    """``rows`` in at most one partition per core of the application: a pass that scores shipped
    vectors costs little per row, so each Python task's fixed cost (about 0.1 s) would dominate
    with many small partitions."""
    return rows.coalesce(max(1, rows.sparkSession.sparkContext.defaultParallelism))


def partitions(df: DataFrame) -> int:
    return int(df.sparkSession.conf.get("spark.sql.shuffle.partitions", "8") or 8)


def score_cell_rows(rows: DataFrame, dim: int, k: int, max_bucket: int, seed: int, block_size: int,
                    segments: Segments = ()) -> DataFrame:
    """Score shuffled cell rows (:data:`recsys.knn.arrow.CELL_ROW_SCHEMA`): one group of cells at a time.

    Rows are grouped by ``grp``: one Python call holds one group's rows (Arrow, about
    ``rows × d × 4`` bytes; :data:`recsys.knn.index.GROUP_ROWS` sets the home articles per group),
    runs :func:`score_cells` and emits each query's top-``k`` within the group (:func:`pair_schema`).
    """
    order_plane = np.random.default_rng(seed + 7919).standard_normal(dim).astype(np.float32)
    n_seg = len(segments)

    def score(group: pa.Table) -> pa.Table:
        """One group's rows → each query's top-k pairs within the group."""
        task_threads()
        table = group.combine_chunks()
        if table.num_rows == 0:
            return pa.Table.from_batches([], pair_schema_arrow)
        vec = vectors_of(table.column("vec").chunk(0), dim)
        ids = table.column("idx").to_numpy()
        spans = []
        for name in ("homes", "probes"):
            col = table.column(name).chunk(0)
            off = col.offsets.to_numpy()
            spans.append((np.repeat(np.arange(len(col), dtype=np.int64), np.diff(off)), col.flatten().to_numpy()))
        result = score_cells(vec, ids, spans[0], spans[1], k, max_bucket, vec @ order_plane, block_size)
        seg = pair_segment_cosines(vec, result.rows, result.cols, segments) if n_seg else None
        # a grouped function's result must match the schema exactly (list<element: float not null>)
        return pa.Table.from_batches([pairs_batch(ids[result.rows], ids[result.cols], result.scores, seg)]).cast(
            pair_schema_arrow)

    pair_schema_arrow = to_arrow_schema(pair_schema(segments))

    # groupBy, not repartition + mapInArrow: a repartition whose child is already hash-partitioned
    # on grp (a join on grp upstream) is planned away, and AQE may then read that join's shuffle
    # locally (one task per map output), splitting a group over tasks; pairs across the split are
    # never scored (apache/spark#30432, #33541: only a repartition at the root of the plan is kept).
    # A grouped operator's required distribution survives every AQE rule.
    return rows.groupBy("grp").applyInArrow(score, pair_schema(segments))


def merge_pairs(pairs: DataFrame, k: int, segments: Segments = ()) -> DataFrame:
    """Shuffle candidate pairs by query and keep the global top-``k`` (``pair_schema(segments, ranked=True)``)."""

    def merge(table: pa.Table) -> pa.Table:
        table = table.drop_columns(["_part"]).combine_chunks()
        keep, rank = merge_top_k(table.column("idx").to_numpy(), table.column("nidx").to_numpy(),
                                 table.column("score").to_numpy(), k)
        return table.take(pa.array(keep)).append_column("rank", pa.array(rank)).cast(ranked_schema)

    ranked_schema = to_arrow_schema(pair_schema(segments, ranked=True))

    # every pair of a query in one call: grouped by a slice of idx (one group per shuffle
    # partition), for the reason given in score_cell_rows
    part = F.pmod(F.col("idx"), F.lit(partitions(pairs))).alias("_part")
    return pairs.select("*", part).groupBy("_part").applyInArrow(merge, pair_schema(segments, ranked=True))


def materialised(result: DataFrame) -> DataFrame:
    """``result`` computed once and kept as a local checkpoint, so the caches it was computed
    from can be unpersisted. The checkpoint's blocks (memory, spilling to disk) go when the
    returned DataFrame is garbage-collected (Spark's ContextCleaner); nothing stays in the
    session's cache for a caller to unpersist."""
    return result.localCheckpoint(eager=True)


def named(ranked: DataFrame, names: DataFrame, segments: Segments) -> DataFrame:
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
            a = vectors_of(batch.column("vec"), dim)
            b = vectors_of(batch.column("nvec"), dim)
            seg = segment_cosines(a, b, segments)
            pairs = pairs_batch(batch.column("idx").to_numpy(), batch.column("nidx").to_numpy(),
                                 batch.column("score").to_numpy(), seg)
            yield pa.RecordBatch.from_arrays([*pairs.columns, batch.column("rank")],
                                             names=[*pairs.schema.names, "rank"])

    columns = joined.select("idx", "nidx", "score", "rank", "vec", "nvec")
    return columns.mapInArrow(fill, pair_schema(segments, ranked=True))  # type: ignore[arg-type]
