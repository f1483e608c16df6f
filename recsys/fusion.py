"""The fused vector: which modality occupies which slice of it, with which weight, and the
current vectors per modality it is built from."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType, IntegerType, StringType, StructField, StructType

from recsys import tables
from recsys.config import Config
from recsys.encoders.text import model_id as text_model_id
from recsys.encoders.text import resolve_model_path

logger = logging.getLogger(__name__)


def current_vectors(spark: SparkSession, cfg: Config, model_ids: dict[str, str]) -> DataFrame:
    """``(article_id, modality, vector)`` for the current articles and the given model per modality."""
    db = cfg.data.database
    condition = F.lit(False)
    for modality, mid in model_ids.items():
        condition = condition | ((F.col("modality") == modality) & (F.col("model_id") == mid))
    current = tables.read(spark, db, tables.ARTICLES).select("article_id")
    return (
        tables.read(spark, db, tables.ITEM_EMBEDDINGS)
        .where(condition)
        .join(current, "article_id", "left_semi")
        .select("article_id", "modality", "vector", "dim")
    )


def fuse_vectors(vectors: DataFrame, weights: dict[str, float]) -> tuple[DataFrame, dict[str, tuple[int, int]]]:
    """Fuse each article's modality vectors into one (see the module docstring).

    The fused vector is the concatenation, in modality name order, of ``sqrt(w_m) * v_m`` over
    the modalities the article has, divided by ``sqrt(sum of those w_m)``: the cosine of two
    fused vectors is the weighted mean of the per-modality cosines when both have every modality.

    Args:
        vectors: ``(article_id, modality, vector array<float>, dim int)``, L2-normalised, one
            row per article and modality; modalities not in ``weights`` are ignored.
        weights: modality to weight; weights <= 0 are left out.

    Returns:
        ``(fused, segments)``: ``fused`` has ``(article_id, vector array<float>, dim int)``, one
        row per article with at least one weighted modality; ``segments`` gives each modality's
        ``[start, end)`` slice of the fused vector.

    Raises:
        ValueError: no weighted modality has vectors, or a modality has vectors of two lengths.
    """
    weights = {m: w for m, w in weights.items() if w > 0}
    order = sorted(weights)
    vectors = vectors.where(F.col("modality").isin(*order))
    dims_rows = vectors.groupBy("modality").agg(F.min("dim").alias("lo"), F.max("dim").alias("hi")).collect()
    dims = {r["modality"]: int(r["lo"]) for r in dims_rows}
    for r in dims_rows:
        if r["lo"] != r["hi"]:
            raise ValueError(f"fusion: modality {r['modality']} has vectors of dims {r['lo']}..{r['hi']}")
    order = [m for m in order if m in dims]
    if not order:
        raise ValueError(f"fusion: no vectors for any weighted modality of {sorted(weights)}; run the embed stage first")
    segments: dict[str, tuple[int, int]] = {}
    start = 0
    for m in order:
        segments[m] = (start, start + dims[m])
        start += dims[m]
    total = start
    pivot = vectors.groupBy("article_id").pivot("modality", list[object](order)).agg(F.first("vector"))  # type: ignore[arg-type]
    schema = StructType(
        [StructField("article_id", StringType()), StructField("vector", ArrayType(FloatType(), False)),
         StructField("dim", IntegerType())]
    )

    def combine(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            out = np.zeros((len(batch), total), dtype=np.float32)
            mass = np.zeros(len(batch), dtype=np.float32)
            for m in order:
                lo, hi = segments[m]
                w = np.float32(np.sqrt(weights[m]))
                for i, v in enumerate(batch[m]):
                    if v is not None:
                        out[i, lo:hi] = w * np.asarray(v, dtype=np.float32)
                        mass[i] += weights[m]
            out /= np.sqrt(np.maximum(mass, 1e-12))[:, None]
            yield pd.DataFrame({"article_id": batch["article_id"], "vector": list(out), "dim": total})

    return pivot.mapInPandas(combine, schema), segments  # type: ignore[arg-type]


def current_model_ids(spark: SparkSession, cfg: Config) -> dict[str, str]:
    """The model per modality this configuration serves.

    Text: derived from ``cfg.text`` (so a changed model is noticed). Metadata and fused: the one
    model id the table holds (those vectors are replaced whole each run).
    """
    ids: dict[str, str] = {}
    rows = (
        tables.read(spark, cfg.data.database, tables.ITEM_EMBEDDINGS)
        .where(F.col("modality").isin("metadata", "fused", "image", "behaviour"))
        .select("modality", "model_id")
        .distinct()
        .collect()
    )
    for row in rows:
        if row["modality"] == "behaviour" and not cfg.behaviour.enabled:
            continue
        ids[row["modality"]] = row["model_id"]
    if cfg.text.enabled:
        ids["text"] = text_model_id(resolve_model_path(cfg.text.model), cfg.text.max_length)
    return ids


def fused_segments(spark: SparkSession, cfg: Config, model_ids: dict[str, str]) -> tuple[tuple[str, int, int], ...]:
    """The ``(modality, start, end)`` slices of the fused vector (same order as :func:`recsys.embed.fuse`)."""
    weights = {m: w for m, w in cfg.fusion.weights.items() if w > 0 and m in model_ids}
    dims: dict[str, int] = dict(
        tables.read(spark, cfg.data.database, tables.ITEM_EMBEDDINGS)
        .where(F.col("modality").isin(*weights))
        .where(F.col("model_id").isin(*[model_ids[m] for m in weights]))
        .groupBy("modality").agg(F.min("dim")).collect()
    )
    segments, start = [], 0
    for m in sorted(weights):
        if m in dims:
            segments.append((m, start, start + int(dims[m])))
            start += int(dims[m])
    return tuple(segments)
