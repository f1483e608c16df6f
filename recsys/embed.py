"""Embed stage: text (pandas UDF), metadata (Spark ML one-hot) and the fused vector per article.

All vectors go to ``item_embeddings`` (article_id, modality, model_id), L2-normalised float32.

Fusion (weighted concatenation): for the modalities m an article has, with config weights w_m,
``fused = concat(sqrt(w_m) * v_m) / sqrt(sum w_m)``. Each part is unit length, so the result is
unit length, and for two articles with the same modalities ``cos(fused) = sum w_m cos_m / sum w_m``:
a weight is the modality's share of the fused similarity. An article missing a modality gets a
fused vector from the ones it has (its part is zeros and the weights re-normalise).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from pyspark.ml import Pipeline
from pyspark.ml.feature import OneHotEncoder, StringIndexer, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf
from pyspark.sql.types import ArrayType, FloatType, IntegerType, StringType, StructField, StructType

from recsys import tables
from recsys.config import Config
from recsys.encoders.text import model_id as text_model_id
from recsys.encoders.text import resolve_model_path
from recsys.inference import TextEmbedderSpec, make_text_embedder
from recsys.sources.schema import TEMPLATE_FIELDS, render_text

logger = logging.getLogger(__name__)


def torch_threads(spark: SparkSession, configured: int) -> int:
    """Torch threads per Python worker: ``configured``, or ``spark.task.cpus`` (cores ÷ tasks)."""
    if configured > 0:
        return configured
    return max(1, int(spark.conf.get("spark.task.cpus", "1") or 1))


def article_texts(articles: DataFrame, template: str) -> DataFrame:
    """``(article_id, text, content_hash)``: the article text from ``template``, and its sha256."""

    @pandas_udf(StringType())  # type: ignore[call-overload]
    def render(fields: pd.DataFrame) -> pd.Series:
        records = fields.to_dict("records")
        return pd.Series([render_text(template, r) for r in records])

    struct = F.struct(*[F.col(name) for name in TEMPLATE_FIELDS])
    return articles.select("article_id", render(struct).alias("text")).withColumn(
        "content_hash", F.sha2("text", 256)
    )


def embed_text(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Embed the text of every article whose text or model changed since it was last embedded.

    Returns:
        ``{model_id, articles, embedded, skipped, seconds, texts_per_s}``.
    """
    db = cfg.data.database
    path = resolve_model_path(cfg.text.model)
    mid = text_model_id(path, cfg.text.max_length)
    articles = tables.read(spark, db, tables.ARTICLES)
    texts = article_texts(articles, cfg.text.template)
    existing = (
        tables.read(spark, db, tables.ITEM_EMBEDDINGS)
        .where((F.col("modality") == "text") & (F.col("model_id") == mid))
        .select("article_id", F.col("content_hash").alias("done_hash"))
    )
    todo = (
        texts.join(existing, "article_id", "left")
        .where(F.col("done_hash").isNull() | (F.col("done_hash") != F.col("content_hash")))
        .drop("done_hash")
        .persist()
    )
    n_todo = todo.count()
    n_all = articles.count()
    spec = TextEmbedderSpec(
        model_path=path,
        batch_size=cfg.text.batch_size,
        max_length=cfg.text.max_length,
        torch_threads=torch_threads(spark, cfg.text.torch_threads),
    )
    started = time.perf_counter()
    if n_todo:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.text.arrow_batch_size))
        # a multiple of the task slots, so no round of tasks leaves cores idle; about 5,000
        # texts per task keeps the tail short
        slots = spark.sparkContext.defaultParallelism
        partitions = slots * max(1, -(-n_todo // (5_000 * slots)))
        embedder = make_text_embedder(spec)
        vectors = (
            todo.repartition(partitions, "article_id")
            .sortWithinPartitions(F.length("text"))
            .select(
                "article_id",
                F.lit("text").alias("modality"),
                F.lit(mid).alias("model_id"),
                embedder("text").alias("vector"),
                "content_hash",
                F.lit(run_id).alias("run_id"),
            )
            .withColumn("dim", F.size("vector"))
        )
        tables.merge(spark, db, tables.ITEM_EMBEDDINGS, vectors)
    seconds = time.perf_counter() - started
    todo.unpersist()
    rate = n_todo / seconds if n_todo and seconds > 0 else 0.0
    logger.info(
        "embed text: %d articles, %d embedded, %d unchanged, %.1f s, %.1f texts/s (model %s)",
        n_all, n_todo, n_all - n_todo, seconds, rate, mid,
    )
    return {
        "model_id": mid,
        "articles": n_all,
        "embedded": n_todo,
        "skipped": n_all - n_todo,
        "seconds": round(seconds, 2),
        "texts_per_s": round(rate, 2),
    }


def _metadata_frame(articles: DataFrame, cfg: Config) -> tuple[DataFrame, list[str]]:
    columns = [*cfg.metadata.columns, *(f"attr_{a}" for a in cfg.metadata.attributes)]
    frame = articles.select(
        "article_id",
        *[F.col(c) for c in cfg.metadata.columns],
        *[F.col("attributes").getItem(a).alias(f"attr_{a}") for a in cfg.metadata.attributes],
    )
    return frame, columns


def embed_metadata(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """One-hot encode the categorical attributes (Spark ML) into one unit vector per article.

    Each column c is one-hot encoded (``StringIndexer`` with ``handleInvalid="keep"`` and
    ``OneHotEncoder`` with ``dropLast=True``, so a missing value is the all-zero part), scaled by
    ``sqrt(weight_c)``, concatenated and L2-normalised: the cosine of two articles is the
    weighted share of attributes they have in common. Labels are fitted on the whole current
    catalogue each run, so the vectors are always recomputed (cheap) and replace the last ones.

    Returns:
        ``{model_id, articles, dim, seconds}``.
    """
    db = cfg.data.database
    started = time.perf_counter()
    articles = tables.read(spark, db, tables.ARTICLES)
    frame, columns = _metadata_frame(articles, cfg)
    indexers = [
        StringIndexer(inputCol=c, outputCol=f"{c}__idx", handleInvalid="keep", stringOrderType="alphabetAsc")
        for c in columns
    ]
    encoder = OneHotEncoder(
        inputCols=[f"{c}__idx" for c in columns], outputCols=[f"{c}__vec" for c in columns], dropLast=True
    )
    fitted = Pipeline(stages=[*indexers, encoder]).fit(frame)
    labels = {c: list(stage.labels) for c, stage in zip(columns, fitted.stages[: len(columns)])}  # type: ignore[attr-defined]
    weights = {c: float(cfg.metadata.column_weights.get(c, 1.0)) for c in columns}
    recipe = json.dumps({"columns": columns, "weights": weights, "labels": labels}, sort_keys=True)
    mid = "onehot@" + hashlib.sha256(recipe.encode()).hexdigest()[:12]
    encoded = fitted.transform(frame)
    assembled = VectorAssembler(inputCols=[f"{c}__vec" for c in columns], outputCol="onehot").transform(encoded)
    scale = np.concatenate([np.full(len(labels[c]), np.sqrt(weights[c]), dtype=np.float32) for c in columns])
    dim = int(scale.size)

    @pandas_udf(ArrayType(FloatType(), False))  # type: ignore[call-overload]
    def normalise(arrays: pd.Series) -> pd.Series:
        out = []
        for values in arrays:
            v = np.asarray(values, dtype=np.float32) * scale
            norm = float(np.linalg.norm(v))
            out.append(v / norm if norm > 0 else v)
        return pd.Series(out)

    vectors = assembled.select(
        "article_id",
        F.lit("metadata").alias("modality"),
        F.lit(mid).alias("model_id"),
        normalise(vector_to_array(F.col("onehot"), "float32")).alias("vector"),
        F.lit(dim).alias("dim"),
        F.lit(mid).alias("content_hash"),
        F.lit(run_id).alias("run_id"),
    )
    tables.replace(spark, db, tables.ITEM_EMBEDDINGS, vectors, "modality = 'metadata'")
    seconds = time.perf_counter() - started
    n = tables.read(spark, db, tables.ITEM_EMBEDDINGS).where("modality = 'metadata'").count()
    logger.info("embed metadata: %d articles, dim %d, %.1f s (model %s)", n, dim, seconds, mid)
    return {"model_id": mid, "articles": n, "dim": dim, "seconds": round(seconds, 2)}


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


def fuse(spark: SparkSession, cfg: Config, run_id: str, model_ids: dict[str, str]) -> dict[str, Any]:
    """Fuse each article's modality vectors (see the module docstring) into ``modality='fused'``.

    Args:
        model_ids: the model per modality to fuse (modalities with weight 0 are left out).

    Returns:
        ``{model_id, articles, dim, segments, seconds}``; ``segments`` gives each modality's
        ``[start, end)`` slice of the fused vector, from which per-modality cosines are recovered.

    Raises:
        ValueError: if no modality with a positive weight has vectors.
    """
    started = time.perf_counter()
    weights = {m: w for m, w in cfg.fusion.weights.items() if w > 0 and m in model_ids}
    if not weights:
        raise ValueError(f"fusion: none of the weighted modalities {sorted(cfg.fusion.weights)} has vectors")
    order = sorted(weights)
    vectors = current_vectors(spark, cfg, {m: model_ids[m] for m in order})
    dims_rows = vectors.groupBy("modality").agg(F.min("dim").alias("lo"), F.max("dim").alias("hi")).collect()
    dims = {r["modality"]: int(r["lo"]) for r in dims_rows}
    for r in dims_rows:
        if r["lo"] != r["hi"]:
            raise ValueError(f"fusion: modality {r['modality']} has vectors of dims {r['lo']}..{r['hi']}")
    order = [m for m in order if m in dims]
    if not order:
        raise ValueError("fusion: no vectors for any weighted modality; run the embed stage first")
    segments: dict[str, tuple[int, int]] = {}
    start = 0
    for m in order:
        segments[m] = (start, start + dims[m])
        start += dims[m]
    total = start
    recipe = json.dumps({m: [model_ids[m], weights[m]] for m in order}, sort_keys=True)
    mid = "fused@" + hashlib.sha256(recipe.encode()).hexdigest()[:12]
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

    fused = pivot.mapInPandas(combine, schema).select(  # type: ignore[arg-type]
        "article_id",
        F.lit("fused").alias("modality"),
        F.lit(mid).alias("model_id"),
        "vector",
        "dim",
        F.lit(mid).alias("content_hash"),
        F.lit(run_id).alias("run_id"),
    )
    tables.replace(spark, cfg.data.database, tables.ITEM_EMBEDDINGS, fused, "modality = 'fused'")
    n = tables.read(spark, cfg.data.database, tables.ITEM_EMBEDDINGS).where("modality = 'fused'").count()
    seconds = time.perf_counter() - started
    logger.info("fuse %s: %d articles, dim %d, %.1f s", "+".join(order), n, total, seconds)
    return {"model_id": mid, "articles": n, "dim": total, "segments": segments, "seconds": round(seconds, 2)}
