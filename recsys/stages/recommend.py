"""Neighbours and recommend stages: top-K per modality into ``item_neighbours``, the fused lists
into ``item_recommendations``, with quality figures for the run's metrics."""

from __future__ import annotations

import logging
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from recsys import state, tables
from recsys.config import Config

logger = logging.getLogger(__name__)

STAGE = "recommend"
INPUTS = (tables.ITEM_NEIGHBOURS,)
OUTPUTS = (tables.ITEM_RECOMMENDATIONS,)


def run(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """``item_recommendations``: the fused neighbours (or, when fusion is off, the first
    configured modality's) with each modality's score. One MERGE makes the table equal to the
    lists and writes only the rows that differ (a list that changed, one that is new, the rows of
    a removed article), so readers see the previous lists or the new ones, never a mix.

    Skips (and says so) when ``item_neighbours`` and ``item_recommendations`` kept their rows
    since its last run with the same ``knn.modalities``. Otherwise every list is compared (the
    neighbours stage replaces a modality's slice in one write, so ``item_neighbours``' change
    data feed would name every row of it).

    Returns:
        ``{source_modality, articles, rows}``, or ``{skipped}``.

    Raises:
        RuntimeError: no neighbours have been computed yet.
    """
    db = cfg.data.database
    consumed = state.versions(spark, db, INPUTS)
    available = {
        r["modality"] for r in tables.read(spark, db, tables.ITEM_NEIGHBOURS).select("modality").distinct().collect()
    }
    preferred = [m for m in ("fused", *cfg.knn.modalities) if m in available]
    if not preferred:
        raise RuntimeError("recommend: item_neighbours is empty; run the neighbours stage first")
    modality = preferred[0]
    settings = {"modalities": state.fingerprint(list(cfg.knn.modalities)), "source": modality}
    last = state.unchanged_since_last_run(spark, db, STAGE, (*INPUTS, *OUTPUTS), settings)
    if last is not None:
        logger.info("recommend: item_neighbours unchanged since run %s, skipped", last)
        return {"skipped": f"inputs unchanged since run {last}"}
    rows = tables.read(spark, db, tables.ITEM_NEIGHBOURS).where(F.col("modality") == modality).select(
        "article_id",
        "rank",
        F.col("neighbour_id").alias("recommended_id"),
        "score",
        F.coalesce("modality_scores", F.create_map(F.lit(modality), F.col("score"))).alias("modality_scores"),
        F.lit(run_id).alias("run_id"),
    )
    tables.merge(spark, db, tables.ITEM_RECOMMENDATIONS, rows, only_changed=True, delete_missing="true")
    state.record(spark, db, STAGE, run_id, {**consumed, **state.versions(spark, db, OUTPUTS)}, settings)
    counts = tables.first_row(
        tables.read(spark, db, tables.ITEM_RECOMMENDATIONS)
        .agg(F.count(F.lit(1)).alias("rows"), F.countDistinct("article_id").alias("articles"))
    )
    logger.info("recommend: %d articles, %d rows (from %s neighbours)", counts["articles"], counts["rows"], modality)
    return {"source_modality": modality, "articles": int(counts["articles"]), "rows": int(counts["rows"])}
