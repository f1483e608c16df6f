"""Top-K nearest neighbours by cosine similarity: LSH candidates with exact re-scoring, and exact KNN.

LSH backend (sign-random-projection LSH for cosine, Charikar 2002, "Similarity estimation
techniques from rounding algorithms", STOC; banding as in Leskovec, Rajaraman & Ullman,
*Mining of Massive Datasets*, ch. 3.4):

1. Each vector v gets ``bands`` codes of ``bits_per_band`` bits, bit j = sign(h_j · v) for
   Gaussian hyperplanes h_j (fixed by ``seed``). Two vectors at angle θ share a bit with
   probability 1 - θ/π, a band with probability (1 - θ/π)^r, and at least one of b bands with
   probability 1 - (1 - (1 - θ/π)^r)^b.
2. Rows ``(band, code, idx, vector bytes)`` are shuffled so each bucket lands in one partition;
   a pandas UDF walks the buckets of its partition and scores every pair inside a bucket
   exactly, as dense block products (small buckets are packed together into block-diagonal
   blocks). A bucket larger than ``max_bucket_size`` is sorted by a random projection and
   scored in sliding windows, so a skewed bucket costs O(n · max_bucket_size), not O(n²).
3. Each bucket emits its members' top-K; a second shuffle by query merges the candidates from
   all bands into the global top-K.

Nothing collects the vectors on the driver: the only driver-side data are the hyperplanes and,
for recall measurement, a sample of query vectors.

Top-K contract (all backends): the query itself is excluded; order is score descending, then
neighbour id ascending (ids are ranked by ``article_id``, so ties break on ``article_id``);
ranks are 1..K without gaps; an article with fewer than K candidates gets fewer rows, never
padding. Scores are cosine similarities of the L2-normalised input vectors (float32 dot
products).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
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

PAIR_SCHEMA = StructType(
    [
        StructField("idx", LongType(), False),
        StructField("nidx", LongType(), False),
        StructField("score", FloatType(), False),
        StructField("segment_scores", ArrayType(FloatType()), True),
    ]
)
RANKED_SCHEMA = StructType([*PAIR_SCHEMA.fields, StructField("rank", IntegerType(), False)])
PACK_ROWS = 1024  # small buckets are packed into block-diagonal blocks of about this many rows


@dataclass(frozen=True)
class LSHParams:
    """Sign-random-projection LSH parameters (see the module docstring for what each buys)."""

    bands: int = 24
    bits_per_band: int = 0
    target_bucket_size: int = 256
    max_bucket_size: int = 4000
    seed: int = 42

    def resolved(self, n: int) -> LSHParams:
        """With ``bits_per_band == 0``, pick ``ceil(log2(n / target_bucket_size))`` bits (at
        least 0: a catalogue smaller than the target is one bucket, i.e. exact)."""
        if self.bits_per_band > 0:
            return self
        bits = max(0, math.ceil(math.log2(max(1, n) / self.target_bucket_size)))
        return replace(self, bits_per_band=bits)


Segments = tuple[tuple[str, int, int], ...]


# ---------------------------------------------------------------- numpy kernels (no Spark)


def top_k_rows(
    scores: np.ndarray, col_ids: np.ndarray, k: int, row_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` columns of each row of ``scores``, ties broken by the smaller column id.

    Args:
        scores: ``(n, m)`` float32; ``-inf`` marks pairs that must not be returned.
        col_ids: ``(m,)`` int64 id of each column (the tie-break key).
        k: how many per row (rows with fewer finite scores return fewer).
        row_ids: ``(n,)`` ids of the rows; defaults to ``0..n-1``.

    Returns:
        ``(rows, cols, values)``: flat arrays, grouped by row in row order, each row's entries
        ordered by score descending then column id ascending; ``cols`` index into ``scores``.
    """
    n, m = scores.shape
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
    order = np.lexsort((col_ids[cols], -values, rows if row_ids is None else row_ids[rows]))
    rows, cols, values = rows[order], cols[order], values[order]
    # rank within each row, keep the first k
    starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    keep = rank < k
    return rows[keep], cols[keep], values[keep]


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
        rows, cols, values = top_k_rows(s, ids, kk)
        neighbours[start:stop] = cols.reshape(stop - start, kk)
        scores[start:stop] = values.reshape(stop - start, kk)
    return neighbours, scores


def hyperplanes(dim: int, params: LSHParams) -> np.ndarray:
    """``(dim, bands · bits_per_band + 1)`` float32 Gaussian hyperplanes; the last column is the
    projection used to order oversized buckets."""
    rng = np.random.default_rng(params.seed)
    return rng.standard_normal((dim, params.bands * params.bits_per_band + 1)).astype(np.float32)


def band_codes(vectors: np.ndarray, planes: np.ndarray, params: LSHParams) -> tuple[np.ndarray, np.ndarray]:
    """Band codes ``(n, bands)`` int64 and the ordering projection ``(n,)`` float32."""
    projected = vectors @ planes
    if params.bits_per_band == 0:
        return np.zeros((len(vectors), params.bands), dtype=np.int64), projected[:, -1].astype(np.float32)
    bits = projected[:, :-1] > 0
    weights = (1 << np.arange(params.bits_per_band, dtype=np.int64))
    codes = bits.reshape(len(vectors), params.bands, params.bits_per_band).astype(np.int64) @ weights
    return codes, projected[:, -1].astype(np.float32)


def _emit(
    out: list[tuple[np.ndarray | None, ...]],
    vectors: np.ndarray,
    ids: np.ndarray,
    query_rows: np.ndarray,
    data_rows: np.ndarray,
    scores: np.ndarray,
    k: int,
    segments: Segments,
) -> None:
    rows, cols, values = top_k_rows(scores, ids[data_rows], k, ids[query_rows])
    q, d = query_rows[rows], data_rows[cols]
    seg = segment_cosines(vectors[q], vectors[d], segments) if segments else None
    out.append((ids[q], ids[d], values, seg))


def score_bucket(
    vectors: np.ndarray, ids: np.ndarray, proj: np.ndarray, k: int, max_bucket: int, segments: Segments
) -> list[tuple[np.ndarray | None, ...]]:
    """Exact top-``k`` within one bucket (windowed when larger than ``max_bucket``)."""
    n = len(ids)
    out: list[tuple[np.ndarray | None, ...]] = []
    if n < 2:
        return out
    if n <= max_bucket:
        s = vectors @ vectors.T
        np.fill_diagonal(s, -np.inf)
        rows = np.arange(n)
        _emit(out, vectors, ids, rows, rows, s, k, segments)
        return out
    order = np.argsort(proj, kind="stable")
    width = max(1, max_bucket // 2)
    chunks = [order[i : i + width] for i in range(0, n, width)]
    for i, query in enumerate(chunks):
        data = np.concatenate(chunks[max(0, i - 1) : i + 2])
        s = vectors[query] @ vectors[data].T
        s[ids[query][:, None] == ids[data][None, :]] = -np.inf
        _emit(out, vectors, ids, query, data, s, k, segments)
    return out


def score_pack(
    vectors: np.ndarray, ids: np.ndarray, group: np.ndarray, k: int, segments: Segments
) -> list[tuple[np.ndarray | None, ...]]:
    """Exact top-``k`` within each of several small buckets at once (``group`` labels rows)."""
    out: list[tuple[np.ndarray | None, ...]] = []
    if len(ids) < 2:
        return out
    s = vectors @ vectors.T
    s[group[:, None] != group[None, :]] = -np.inf
    np.fill_diagonal(s, -np.inf)
    rows = np.arange(len(ids))
    _emit(out, vectors, ids, rows, rows, s, k, segments)
    return out


def _concat(parts: list[tuple[np.ndarray | None, ...]], n_segments: int) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame(
            {"idx": np.zeros(0, np.int64), "nidx": np.zeros(0, np.int64), "score": np.zeros(0, np.float32),
             "segment_scores": pd.Series([], dtype=object)}
        )
    idx = np.concatenate([p[0] for p in parts])
    nidx = np.concatenate([p[1] for p in parts])
    score = np.concatenate([p[2] for p in parts]).astype(np.float32)
    if n_segments:
        seg = np.concatenate([p[3] for p in parts])
        segment_scores: pd.Series = pd.Series(list(seg))
    else:
        segment_scores = pd.Series([None] * len(idx), dtype=object)
    return pd.DataFrame({"idx": idx, "nidx": nidx, "score": score, "segment_scores": segment_scores})


def merge_top_k(pairs: pd.DataFrame, k: int) -> pd.DataFrame:
    """Global top-``k`` per ``idx`` from candidate pairs (duplicates from several bands allowed).

    Returns:
        ``idx, nidx, score, segment_scores, rank`` with rank 1..k per idx, score descending
        then nidx ascending.
    """
    if pairs.empty:
        return pairs.assign(rank=pd.Series([], dtype=np.int32))
    pairs = pairs.sort_values(["idx", "score", "nidx"], ascending=[True, False, True], kind="stable")
    pairs = pairs.drop_duplicates(["idx", "nidx"], keep="first")
    rank = pairs.groupby("idx", sort=False).cumcount().to_numpy() + 1
    pairs = pairs.assign(rank=rank.astype(np.int32))
    return pairs[pairs["rank"] <= k]


# ---------------------------------------------------------------- Spark


def with_index(vectors: DataFrame) -> DataFrame:
    """Add ``idx`` (int64): the rank of ``article_id`` in ascending order, 0-based.

    Only ids are ordered (``zipWithIndex`` over a range-partitioned sort), then joined back, so
    the vectors never pass through a single partition.
    """
    ids = vectors.select("article_id").orderBy("article_id")
    indexed = ids.rdd.map(lambda row: row[0]).zipWithIndex().toDF(
        StructType([StructField("article_id", StringType(), False), StructField("idx", LongType(), False)])
    )
    return vectors.join(indexed, "article_id")


def check_vectors(vectors: DataFrame) -> int:
    """Validate ``(article_id, vector)`` in one aggregate and return the dimension.

    Raises:
        ValueError: vectors of different lengths, or vectors with NaN/inf values, or a zero
            vector (a cosine is undefined), naming how many and one article_id.
    """
    bad_value = F.exists("vector", lambda x: F.isnan(x) | (F.abs(x) == float("inf")))
    norm2 = F.aggregate("vector", F.lit(0.0).cast("double"), lambda acc, x: acc + x * x)
    stats = first_row(vectors.agg(
        F.count(F.lit(1)).alias("n"),
        F.min(F.size("vector")).alias("lo"),
        F.max(F.size("vector")).alias("hi"),
        F.count(F.when(bad_value, 1)).alias("nonfinite"),
        F.min(F.when(bad_value, F.col("article_id"))).alias("nonfinite_id"),
        F.count(F.when(~bad_value & (norm2 == 0), 1)).alias("zero"),
        F.min(F.when(~bad_value & (norm2 == 0), F.col("article_id"))).alias("zero_id"),
    ))
    if stats["n"] == 0:
        return 0
    if stats["lo"] != stats["hi"]:
        raise ValueError(f"knn: vectors have different lengths ({stats['lo']}..{stats['hi']})")
    if stats["nonfinite"]:
        raise ValueError(
            f"knn: {stats['nonfinite']} vector(s) hold NaN or inf, e.g. article_id {stats['nonfinite_id']}"
        )
    if stats["zero"]:
        raise ValueError(
            f"knn: {stats['zero']} zero vector(s) have no direction, e.g. article_id {stats['zero_id']}"
        )
    return int(stats["lo"])


def _to_bytes(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for batch in batches:
        yield pd.DataFrame(
            {"idx": batch["idx"], "vec": [np.asarray(v, dtype=np.float32).tobytes() for v in batch["vector"]]}
        )


def lsh_pairs(
    indexed: DataFrame, dim: int, k: int, params: LSHParams, segments: Segments = ()
) -> DataFrame:
    """Candidate pairs from LSH buckets, exactly scored: each member's top-``k`` per bucket.

    Args:
        indexed: ``(idx, vector)`` with L2-normalised float vectors of length ``dim``.

    Returns:
        Rows of :data:`PAIR_SCHEMA` (one article may have up to ``bands · k`` rows).
    """
    planes = hyperplanes(dim, params)
    spark = indexed.sparkSession
    packed = indexed.select("idx", "vector").mapInPandas(
        _to_bytes,  # type: ignore[arg-type]
        StructType([StructField("idx", LongType()), StructField("vec", BinaryType())]),
    )
    bucket_schema = StructType(
        [StructField("band", IntegerType()), StructField("code", LongType()), StructField("proj", FloatType()),
         StructField("idx", LongType()), StructField("vec", BinaryType())]
    )

    def sign(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            if batch.empty:
                continue
            v = np.frombuffer(b"".join(batch["vec"]), dtype=np.float32).reshape(len(batch), dim)
            codes, proj = band_codes(v, planes, params)
            n = len(batch)
            yield pd.DataFrame(
                {
                    "band": np.repeat(np.arange(params.bands, dtype=np.int32)[None, :], n, 0).ravel(),
                    "code": codes.ravel(),
                    "proj": np.repeat(proj, params.bands),
                    "idx": np.repeat(batch["idx"].to_numpy(), params.bands),
                    "vec": np.repeat(batch["vec"].to_numpy(), params.bands),
                }
            )

    n_parts = int(spark.conf.get("spark.sql.shuffle.partitions", "8") or 8)
    buckets = (
        packed.mapInPandas(sign, bucket_schema)  # type: ignore[arg-type]
        .repartition(n_parts, "band", "code")
        .sortWithinPartitions("band", "code", "idx")
    )
    max_bucket = params.max_bucket_size

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        carry: pd.DataFrame | None = None
        pack: list[pd.DataFrame] = []
        pack_rows = 0

        def flush_pack() -> pd.DataFrame:
            frame = pd.concat(pack, ignore_index=True)
            v = np.frombuffer(b"".join(frame["vec"]), dtype=np.float32).reshape(len(frame), dim)
            group = frame["band"].to_numpy().astype(np.int64) * (1 << 40) + frame["code"].to_numpy()
            return _concat(score_pack(v, frame["idx"].to_numpy(), group, k, segments), len(segments))

        def handle(bucket: pd.DataFrame) -> Iterator[pd.DataFrame]:
            nonlocal pack_rows
            n = len(bucket)
            if n < 2:
                return
            if n >= PACK_ROWS // 4:
                v = np.frombuffer(b"".join(bucket["vec"]), dtype=np.float32).reshape(n, dim)
                yield _concat(
                    score_bucket(v, bucket["idx"].to_numpy(), bucket["proj"].to_numpy(), k, max_bucket, segments),
                    len(segments),
                )
                return
            pack.append(bucket)
            pack_rows += n
            if pack_rows >= PACK_ROWS:
                yield flush_pack()
                pack.clear()
                pack_rows = 0

        for batch in batches:
            frame = batch if carry is None else pd.concat([carry, batch], ignore_index=True)
            if frame.empty:
                continue
            key = frame["band"].to_numpy().astype(np.int64) * (1 << 40) + frame["code"].to_numpy()
            bounds = np.r_[0, np.flatnonzero(np.diff(key)) + 1, len(frame)]
            # the last bucket may continue in the next batch: carry it over
            for lo, hi in zip(bounds[:-2], bounds[1:-1]):
                yield from handle(frame.iloc[lo:hi])
            carry = frame.iloc[bounds[-2] :]
        if carry is not None and len(carry):
            yield from handle(carry)
        if pack:
            yield flush_pack()

    return buckets.mapInPandas(score, PAIR_SCHEMA)  # type: ignore[arg-type]


def exact_pairs_for_queries(
    indexed: DataFrame, queries: np.ndarray, query_ids: np.ndarray, k: int, segments: Segments = ()
) -> DataFrame:
    """Exact top-``k`` candidates of the given queries against every vector, per partition.

    ``queries`` (``(q, d)``, a small sample or one chunk) travel with the task closure; the
    vectors stay distributed. Merge the result with :func:`merge_top_k` (see :func:`top_k`).
    """
    q_ids = np.asarray(query_ids, dtype=np.int64)
    q_vec = np.asarray(queries, dtype=np.float32)

    def scan(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            if batch.empty:
                continue
            v = np.stack(batch["vector"].to_numpy()).astype(np.float32)
            ids = batch["idx"].to_numpy()
            s = q_vec @ v.T
            s[q_ids[:, None] == ids[None, :]] = -np.inf
            rows, cols, values = top_k_rows(s, ids, k, q_ids)
            seg = segment_cosines(q_vec[rows], v[cols], segments) if segments else None
            yield _concat([(q_ids[rows], ids[cols], values, seg)], len(segments))

    return indexed.select("idx", "vector").mapInPandas(scan, PAIR_SCHEMA)  # type: ignore[arg-type]


def merge_pairs(pairs: DataFrame, k: int) -> DataFrame:
    """Shuffle candidates by query and keep the global top-``k`` (:func:`merge_top_k`)."""

    def merge(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        frames = [b for b in batches if not b.empty]
        if frames:
            yield merge_top_k(pd.concat(frames, ignore_index=True), k)

    n_parts = int(pairs.sparkSession.conf.get("spark.sql.shuffle.partitions", "8") or 8)
    return pairs.repartition(n_parts, "idx").mapInPandas(merge, RANKED_SCHEMA)  # type: ignore[arg-type]


def sample_queries(indexed: DataFrame, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic sample of ``n`` query vectors (by hash of article_id and seed)."""
    rows = (
        indexed.orderBy(F.xxhash64("article_id", F.lit(seed)), "article_id")
        .limit(n)
        .select("idx", "vector")
        .collect()
    )
    if not rows:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return (
        np.asarray([r["vector"] for r in rows], dtype=np.float32),
        np.asarray([r["idx"] for r in rows], dtype=np.int64),
    )


def top_k(
    vectors: DataFrame,
    k: int,
    backend: str = "lsh",
    params: LSHParams = LSHParams(),
    segments: Segments = (),
    block_size: int = 2048,
) -> DataFrame:
    """Top-``k`` neighbours of every article (the module docstring gives the contract).

    Args:
        vectors: ``(article_id string, vector array<float>)``, one row per article, vectors
            L2-normalised and of one length.
        k: neighbours per article, >= 1.
        backend: ``lsh`` (approximate, scalable) or ``exact`` (all pairs, query blocks of
            ``block_size`` scanned against the distributed vectors).
        params: LSH parameters.
        segments: ``(name, start, end)`` slices of the vector whose cosines are reported too
            (the modalities inside a fused vector).

    Returns:
        ``article_id, rank, neighbour_id, score, segment_scores`` (``array<float>`` in
        ``segments`` order, NaN for a missing modality; null without segments).

    Raises:
        ValueError: ``k < 1``, unknown backend, or vectors of unequal length, with NaN/inf, or
            all zeros (see :func:`check_vectors`).
    """
    if k < 1:
        raise ValueError(f"knn: k must be >= 1, got {k}")
    if backend not in ("lsh", "exact"):
        raise ValueError(f"knn: backend must be 'lsh' or 'exact', got {backend!r}")
    dim = check_vectors(vectors)
    indexed = with_index(vectors.select("article_id", "vector")).persist()
    if dim == 0:
        pairs = indexed.sparkSession.createDataFrame([], PAIR_SCHEMA)
    elif backend == "lsh":
        n = indexed.count()
        resolved = params.resolved(n)
        # with 0 bits every band is the same single bucket: one band is enough
        if resolved.bits_per_band == 0:
            resolved = replace(resolved, bands=1)
        logger.info("lsh: %d vectors, %d bands x %d bits, target bucket %d", n, resolved.bands,
                    resolved.bits_per_band, params.target_bucket_size)
        pairs = lsh_pairs(indexed, dim, k, resolved, segments)
    else:
        pairs = None
        chunk = max(1, block_size)
        n = indexed.count()
        for start in range(0, n, chunk):
            block = indexed.where((F.col("idx") >= start) & (F.col("idx") < start + chunk))
            rows = block.select("idx", "vector").collect()
            q = np.asarray([r["vector"] for r in rows], dtype=np.float32)
            ids = np.asarray([r["idx"] for r in rows], dtype=np.int64)
            part = exact_pairs_for_queries(indexed, q, ids, k, segments)
            pairs = part if pairs is None else pairs.unionByName(part)
    assert pairs is not None
    ranked = merge_pairs(pairs, k)
    if backend == "lsh" and dim:
        ranked = _top_up(indexed, ranked, k, segments, block_size)
    names = indexed.select("idx", "article_id")
    return (
        ranked.join(names, "idx")
        .join(names.select(F.col("idx").alias("nidx"), F.col("article_id").alias("neighbour_id")), "nidx")
        .select("article_id", "rank", "neighbour_id", "score", "segment_scores")
    )


def _top_up(indexed: DataFrame, ranked: DataFrame, k: int, segments: Segments, block_size: int) -> DataFrame:
    """Exact search for the articles LSH left with fewer than ``min(k, n - 1)`` neighbours.

    Such articles sit alone (or nearly) in every bucket; scanning them against all vectors
    gives each its full list. The short articles are processed in chunks of ``block_size``
    query vectors; a large share of them means the LSH parameters are too strict.
    """
    ranked = ranked.persist()
    n = indexed.count()
    want = min(k, n - 1)
    counts = ranked.groupBy("idx").agg(F.count(F.lit(1)).alias("found"))
    short = (
        indexed.select("idx", "vector")
        .join(counts, "idx", "left")
        .where(F.coalesce("found", F.lit(0)) < want)
        .select("idx", "vector")
        .persist()
    )
    n_short = short.count()
    if n_short == 0:
        short.unpersist()
        return ranked
    logger.info("lsh: %d of %d articles had fewer than %d candidates; exact search for them", n_short, n, want)
    extra = None
    ids_all = [r["idx"] for r in short.select("idx").orderBy("idx").collect()]
    for start in range(0, len(ids_all), block_size):
        chunk = ids_all[start : start + block_size]
        rows = short.where(F.col("idx").isin(chunk)).collect()
        q = np.asarray([r["vector"] for r in rows], dtype=np.float32)
        q_ids = np.asarray([r["idx"] for r in rows], dtype=np.int64)
        part = merge_pairs(exact_pairs_for_queries(indexed, q, q_ids, k, segments), k)
        extra = part if extra is None else extra.unionByName(part)
    assert extra is not None
    kept = ranked.join(short.select("idx"), "idx", "left_anti")
    return kept.unionByName(extra)


def recall_at_k(
    vectors: DataFrame, result: DataFrame, k: int, sample: int, seed: int = 7
) -> dict[str, float]:
    """recall@k of ``result`` against exact KNN on a sample of query articles.

    A returned neighbour is a hit when its exact score reaches the exact k-th score (minus
    1e-6), so a tie with the k-th neighbour counts; recall = hits / min(k, n - 1), averaged
    over the sampled queries.

    Returns:
        ``{"recall": r, "queries": q}``.
    """
    indexed = with_index(vectors.select("article_id", "vector")).persist()
    q, q_ids = sample_queries(indexed, sample, seed)
    if len(q_ids) == 0:
        return {"recall": float("nan"), "queries": 0.0}
    truth = merge_pairs(exact_pairs_for_queries(indexed, q, q_ids, k), k)
    names = indexed.select("idx", "article_id")
    kth = truth.groupBy("idx").agg(F.min("score").alias("kth"), F.count(F.lit(1)).alias("possible"))
    query_names = names.join(kth, "idx")
    found = result.join(query_names, "article_id").where(F.col("score") >= F.col("kth") - 1e-6)
    hits = found.groupBy("article_id").agg(F.count(F.lit(1)).alias("hits"))
    per_query = query_names.join(hits, "article_id", "left").select(
        (F.coalesce("hits", F.lit(0)) / F.col("possible")).alias("recall")
    )
    value = first_row(per_query.agg(F.avg("recall")))[0]
    indexed.unpersist()
    return {"recall": float(value), "queries": float(len(q_ids))}


def measure(started: float) -> float:
    """Seconds since ``started`` (``time.perf_counter()``), rounded to 0.01."""
    return round(time.perf_counter() - started, 2)
