"""The LSH index: fit the hash functions (k-means centroids or hyperplanes) on the driver,
assign vectors to their home and probed buckets on the executors, and save and load a fitted
index as a Delta table under the warehouse, so a daily run reuses it."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys import tables
from recsys.knn.arrow import CELL_ROW_SCHEMA, cell_batch, task_threads, vectors_of
from recsys.knn.kernels import band_codes, hyperplanes, nearest, spherical_kmeans
from recsys.knn.params import LSHIndex, LSHParams
from recsys.knn.scoring import partitions, per_core, prepare

GROUP_ROWS = 50_000  # target home articles per group of cells (memory per scoring step)


def assign_cells(indexed: DataFrame, dim: int, index: LSHIndex) -> DataFrame:
    """Cell rows for LSH: each article's home bucket and probed buckets in every band, one row
    per (article, group of buckets) it touches (:data:`CELL_ROW_SCHEMA`)."""
    fitted = index.fitted
    bands = fitted["bands"]
    cell_group, groups = fitted["cell_group"], fitted["groups"]

    def assign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        task_threads()
        for batch in batches:
            if batch.num_rows == 0:
                continue
            idx = batch.column("idx").to_numpy()
            vec = vectors_of(batch.column("vec"), dim)
            m = len(idx)
            probed = probed_cells(vec, index)
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
            yield cell_batch(
                grp[starts], idx[rows[starts]], vec[rows[starts]], np.r_[0, np.cumsum(home_count)], glob[is_home],
                offsets, glob,
            )

    return indexed.select("idx", "vec").mapInArrow(assign, CELL_ROW_SCHEMA)  # type: ignore[arg-type]


def probed_cells(vectors: np.ndarray, index: LSHIndex, probes: int | None = None) -> np.ndarray:
    """The buckets each vector probes in every band, nearest first: ``(m, bands, p)`` int64
    bucket numbers (per band), ``p`` = the index's probes (``kmeans``; at most ``probes`` when
    given) or 1 (``srp``, its own bucket). ``[:, :, 0]`` is the vector's home bucket.

    Args:
        vectors: ``(m, d)`` float32 unit rows, ``d`` = ``index.dim``.
    """
    fitted = index.fitted
    planes: np.ndarray | None = fitted.get("planes")
    if planes is not None:
        return band_codes(vectors, planes, index.params)[:, :, None]
    import torch

    p = fitted["probes"] if probes is None else min(probes, fitted["probes"])
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    centroids: list[np.ndarray] = fitted["centroids"]
    if len(vectors) == 0:
        return np.zeros((0, len(centroids), p), dtype=np.int64)
    return np.stack([nearest(x, torch.from_numpy(c), p).numpy() for c in centroids], axis=1).astype(np.int64)


def cell_keys(cells: np.ndarray) -> np.ndarray:
    """Bucket numbers ``(m, bands[, p])`` → keys unique across bands: ``band << 32 | bucket``."""
    band = np.arange(cells.shape[1], dtype=np.int64).reshape((1, -1) + (1,) * (cells.ndim - 2))
    return (band << 32) | cells.astype(np.int64)


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
    n_parts = partitions(indexed)
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
    cell_group = np.stack([nearest(torch.from_numpy(c), grouping, 1)[:, 0].numpy() for c in centroids])
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
    return vectors_of(table.column("vec").combine_chunks(), dim), table.column("idx").to_numpy()


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
        index = LSHIndex(resolved, dim, fit_hash(indexed, n, dim, resolved))
        return replace(index, largest_bucket=largest_bucket(indexed, dim, index))
    finally:
        indexed.unpersist()


def largest_bucket(indexed: DataFrame, dim: int, index: LSHIndex) -> int:
    """Members of the largest home bucket over all bands (one pass over prepared vectors,
    ``idx, vec``; 0 when there are none)."""

    def count(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        task_threads()
        for batch in batches:
            if batch.num_rows == 0:
                continue
            keys, sizes = np.unique(cell_keys(probed_cells(vectors_of(batch.column("vec"), dim), index, 1)[:, :, 0]),
                                    return_counts=True)
            yield pa.RecordBatch.from_arrays([pa.array(keys, pa.int64()), pa.array(sizes, pa.int64())],
                                             names=["cell", "members"])

    sizes = per_core(indexed.select("vec")).mapInArrow(count, "cell long, members long")  # type: ignore[arg-type]
    row = sizes.groupBy("cell").agg(F.sum("members").alias("m")).agg(F.max("m")).first()
    return int(row[0] or 0) if row is not None else 0


def index_arrays(index: LSHIndex) -> dict[str, np.ndarray]:
    """The fitted hash functions as named arrays: ``cell_group`` ``(bands, cells)`` int64, and
    ``centroids`` ``(bands, cells, d)`` float32 (``kmeans``) or ``planes`` ``(d, bands·bits)`` float32 (``srp``)."""
    fitted = index.fitted
    arrays: dict[str, np.ndarray] = {"cell_group": np.asarray(fitted["cell_group"], dtype=np.int64)}
    if fitted.get("planes") is not None:
        arrays["planes"] = np.asarray(fitted["planes"], dtype=np.float32)
    else:
        arrays["centroids"] = np.stack([np.asarray(c, dtype=np.float32) for c in fitted["centroids"]])
    return arrays


def index_sizes(index: LSHIndex) -> dict[str, int]:
    """The fitted sizes: ``bands``, ``cells`` (buckets per band), ``groups``, ``probes``."""
    return {key: int(index.fitted[key]) for key in ("bands", "cells", "groups", "probes")}


def encode_index(index: LSHIndex) -> tuple[str, str, bytes]:
    """``(index_id, params JSON, npz bytes)`` of a fitted index; ``index_id`` is ``lsh@`` and
    the first 12 hex digits of the SHA-256 of the other two, so equal indexes have equal ids."""
    params = json.dumps({"params": asdict(index.params), "dim": index.dim, **index_sizes(index)}, sort_keys=True)
    buffer = io.BytesIO()
    arrays = index_arrays(index)
    np.savez(buffer, **{name: arrays[name] for name in sorted(arrays)})
    blob = buffer.getvalue()
    digest = hashlib.sha256(params.encode())
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return "lsh@" + digest.hexdigest()[:12], params, blob


def decode_index(params_json: str, blob: bytes) -> LSHIndex:
    """The :class:`LSHIndex` that :func:`encode_index` wrote.

    Raises:
        ValueError: the JSON or the arrays are not an index (a damaged or foreign row).
    """
    try:
        meta = json.loads(params_json)
        params = LSHParams(**meta["params"])
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        fitted: dict[str, Any] = {key: int(meta[key]) for key in ("bands", "cells", "groups", "probes")}
        fitted["cell_group"] = arrays["cell_group"].astype(np.int64)
        if "planes" in arrays:
            fitted["planes"] = arrays["planes"].astype(np.float32)
        else:
            fitted["centroids"] = [c.astype(np.float32) for c in arrays["centroids"]]
        return LSHIndex(params, int(meta["dim"]), fitted)
    except (KeyError, TypeError, ValueError, OSError) as err:
        raise ValueError(f"lsh_index: the stored index cannot be read ({err})") from err


@dataclass(frozen=True)
class SavedIndex:
    """An index as stored in ``lsh_index``: the hash functions and what they were fitted on."""

    index: LSHIndex
    index_id: str
    model_id: str
    articles: int
    run_id: str
    fitted_at: dt.datetime
    changed_since_fit: int = 0

    def bucket_bound(self, n_changed: int) -> int | None:
        """An upper bound on the largest home bucket after ``n_changed`` more new or changed
        vectors: the largest at the fit plus every vector changed since (each joins one bucket
        per band; removed ones only shrink theirs). None when the fit's largest is not known."""
        if self.index.largest_bucket is None:
            return None
        return self.index.largest_bucket + self.changed_since_fit + n_changed


def save_index(
    spark: SparkSession, database: str, modality: str, index: LSHIndex, model_id: str, articles: int, run_id: str
) -> str:
    """Store ``index`` as the current index of ``modality`` (replacing the previous one in one
    Delta commit); returns its ``index_id``."""
    index_id, params, blob = encode_index(index)
    row = spark.createDataFrame(
        [(modality, index_id, model_id, index.dim, params, bytearray(blob), articles, run_id, index.largest_bucket)],
        "modality string, index_id string, model_id string, dim int, params string, hash_functions binary, "
        "articles long, run_id string, largest_bucket long",
    ).withColumn("fitted_at", F.current_timestamp()).withColumn("changed_since_fit", F.lit(0).cast("long"))
    tables.replace(spark, database, tables.LSH_INDEX, row, f"modality = {tables.sql_string(modality)}")
    return index_id


def add_drift(spark: SparkSession, database: str, changed: dict[str, int]) -> None:
    """Add ``changed`` (modality → vectors new, changed or removed by this run's update) to each
    saved index's ``changed_since_fit``, in one Delta commit; modalities without an index are
    left out."""
    if not changed:
        return
    rows = spark.createDataFrame(sorted(changed.items()), "modality string, n long")
    (DeltaTable.forName(spark, tables.qualified(database, tables.LSH_INDEX)).alias("t")
     .merge(rows.alias("s"), "t.modality = s.modality")
     .whenMatchedUpdate(set={"changed_since_fit": "coalesce(t.changed_since_fit, 0) + s.n"})
     .execute())


def load_index(spark: SparkSession, database: str, modality: str) -> SavedIndex | None:
    """The stored index of ``modality``, or ``None`` when none was saved.

    Raises:
        ValueError: the stored row cannot be decoded.
    """
    rows = tables.read(spark, database, tables.LSH_INDEX).where(F.col("modality") == modality).collect()
    if not rows:
        return None
    row = rows[0]
    # nulls: an index saved before the column (ensure_tables adds it)
    index = replace(decode_index(row["params"], bytes(row["hash_functions"])), largest_bucket=row["largest_bucket"])
    return SavedIndex(index, row["index_id"], row["model_id"], int(row["articles"]), row["run_id"], row["fitted_at"],
                      int(row["changed_since_fit"] or 0))
