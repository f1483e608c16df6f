"""Neighbours stage: top-K per modality into ``item_neighbours`` (:mod:`recsys.knn`), with quality figures."""

from __future__ import annotations

import logging
import time
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys import tables
from recsys.config import Config
from recsys.evaluation.probe import linear_probe
from recsys.fusion import current_model_ids, current_vectors, load_layout
from recsys.knn import LSHParams, MLlibParams, recall_at_k, top_k

logger = logging.getLogger(__name__)


def category_precision(spark: SparkSession, cfg: Config, neighbours: DataFrame, column: str = "category_l3") -> float:
    """Share of (article, neighbour) pairs whose ``column`` (default: product type) is equal."""
    cats = tables.read(spark, cfg.data.database, tables.ARTICLES).select("article_id", column)
    joined = neighbours.join(cats, "article_id").join(
        cats.select(F.col("article_id").alias("neighbour_id"), F.col(column).alias("n_cat")), "neighbour_id"
    )
    value = tables.first_row(joined.agg(F.avg((F.col(column) == F.col("n_cat")).cast("double"))))[0]
    return float(value) if value is not None else float("nan")


def run(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Top-K neighbours for each configured modality (``cfg.knn.modalities``).

    Writes ``item_neighbours`` (the modality's rows replaced in one commit). For the fused
    vectors, each pair also carries the cosine in every modality (``modality_scores``).

    Quality per modality: category precision@K over all its articles and over the articles that
    have every modality (``common``, where modalities compare like for like), and a linear probe
    (:func:`recsys.evaluation.probe.linear_probe`) on the common articles.

    Returns:
        Per modality: ``articles``, ``rows``, ``seconds``, ``recall_at_k`` (LSH against exact on
        ``cfg.knn.recall_sample`` queries), ``category_precision_at_k``,
        ``category_precision_common_at_k``, ``probe_macro_f1``, ``probe_accuracy``; and
        ``common_articles``.
    """
    model_ids = current_model_ids(spark, cfg)
    report: dict[str, Any] = {"k": cfg.knn.k, "backend": cfg.knn.backend}
    base = sorted(m for m in model_ids if m != "fused")
    common = (
        current_vectors(spark, cfg, {m: model_ids[m] for m in base})
        .groupBy("article_id")
        .agg(F.countDistinct("modality").alias("n"))
        .where(F.col("n") == len(base))
        .select("article_id")
        .persist()
    )
    try:
        report["common_articles"] = common.count()
        for modality in cfg.knn.modalities:
            if modality not in model_ids:
                logger.info("neighbours %s: no vectors (modality off or not embedded), skipped", modality)
                continue
            vectors = current_vectors(spark, cfg, {modality: model_ids[modality]}).select("article_id", "vector").persist()
            try:
                report[modality] = _neighbours_of(spark, cfg, run_id, modality, vectors, common, model_ids)
            finally:
                vectors.unpersist()
    finally:
        common.unpersist()
    return report


def _neighbours_of(
    spark: SparkSession, cfg: Config, run_id: str, modality: str, vectors: DataFrame, common: DataFrame,
    model_ids: dict[str, str],
) -> dict[str, Any]:
    """One modality of :func:`run`: its lists into ``item_neighbours`` and its figures."""
    db = cfg.data.database
    params = LSHParams(**cfg.knn.lsh.model_dump())
    started = time.perf_counter()
    segments = load_layout(spark, db, model_ids["fused"]).segments if modality == "fused" else ()
    result = top_k(vectors, cfg.knn.k, cfg.knn.backend, params, segments, cfg.knn.block_size,
                   cfg.knn.exact_block_rows, MLlibParams(**cfg.knn.mllib.model_dump()))
    names = F.array(*[F.lit(s[0]) for s in segments]) if segments else None
    scores = (
        F.map_filter(F.map_from_arrays(names, F.col("segment_scores")), lambda _k, v: ~F.isnan(v))  # type: ignore[arg-type]
        if segments
        else F.lit(None).cast("map<string,float>")
    )
    rows = result.select(
        "article_id",
        F.lit(modality).alias("modality"),
        "rank",
        "neighbour_id",
        "score",
        scores.alias("modality_scores"),
        F.lit(run_id).alias("run_id"),
    )
    tables.replace(spark, db, tables.ITEM_NEIGHBOURS, rows, f"modality = '{modality}'")
    seconds = time.perf_counter() - started
    written = tables.read(spark, db, tables.ITEM_NEIGHBOURS).where(F.col("modality") == modality)
    counts = tables.first_row(written.agg(F.count(F.lit(1)).alias("rows"), F.countDistinct("article_id").alias("articles")))
    n_vectors = vectors.count()
    entry: dict[str, Any] = {
        "vectors": n_vectors,
        "articles": int(counts["articles"]),
        "rows": int(counts["rows"]),
        "seconds": round(seconds, 2),
        "category_precision_at_k": round(category_precision(spark, cfg, written), 4),
        "category_precision_common_at_k": round(
            category_precision(spark, cfg, written.join(common, "article_id", "left_semi")), 4
        ),
    }
    entry.update(linear_probe(spark, cfg, vectors.join(common, "article_id", "left_semi")))
    if cfg.knn.recall_sample and cfg.knn.backend != "exact":
        t0 = time.perf_counter()
        r = recall_at_k(vectors, written, cfg.knn.k, cfg.knn.recall_sample)
        entry["recall_at_k"] = round(r["recall"], 4)
        entry["recall_queries"] = int(r["queries"])
        entry["recall_seconds"] = round(time.perf_counter() - t0, 2)
    logger.info(
        "neighbours %s: %d articles, %d rows, %.1f s, recall@%d %s, category precision@%d %.3f "
        "(common articles %.3f), probe macro-F1 %s",
        modality, entry["articles"], entry["rows"], seconds, cfg.knn.k, entry.get("recall_at_k", "n/a"),
        cfg.knn.k, entry["category_precision_at_k"], entry["category_precision_common_at_k"],
        entry.get("probe_macro_f1", "n/a"),
    )
    return entry
