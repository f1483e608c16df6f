"""Behaviour stage: item vectors from purchases (implicit ALS, :mod:`recsys.behaviour`) into ``item_embeddings``."""

from __future__ import annotations

import logging
import time
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from recsys import tables
from recsys.behaviour import als_item_vectors, behaviour_model_id
from recsys.config import Config

logger = logging.getLogger(__name__)


def run(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Behaviour stage: ALS item vectors from ``transactions`` into ``item_embeddings``.

    Replaces every ``modality = 'behaviour'`` row in one commit. Skips (and says so) when the
    stage is off or there are no transactions (e.g. the Fashion Product sample).

    Returns:
        ``{skipped}`` or ``{model_id, transactions, customers, articles_bought, articles, dim,
        below_min_purchases, seconds}``: ``articles`` got a vector; ``below_min_purchases``
        were bought but too rarely (they rely on content).
    """
    if not cfg.behaviour.enabled:
        logger.info("behaviour: off (behaviour.enabled: false), skipped")
        return {"skipped": "behaviour.enabled is false"}
    db = cfg.data.database
    started = time.perf_counter()
    # one scan of the date-partitioned table (hundreds of small files) for the counts and ALS
    transactions = (
        tables.read(spark, db, tables.TRANSACTIONS)
        .select("t_dat", "customer_id", "article_id")
        .join(tables.read(spark, db, tables.ARTICLES).select("article_id"), "article_id", "left_semi")
        .persist()
    )
    stats = tables.first_row(
        transactions.agg(
            F.count(F.lit(1)).alias("n"), F.countDistinct("customer_id").alias("customers"),
            F.countDistinct("article_id").alias("articles"), F.max("t_dat").alias("last"),
        )
    )
    if stats["n"] == 0:
        transactions.unpersist()
        logger.info("behaviour: no transactions, skipped (articles rely on their content modalities)")
        return {"skipped": "no transactions"}
    mid = behaviour_model_id(cfg.behaviour, int(stats["n"]), stats["last"])
    vectors = als_item_vectors(transactions, cfg.behaviour)
    rows = vectors.select(
        "article_id",
        F.lit("behaviour").alias("modality"),
        F.lit(mid).alias("model_id"),
        "vector",
        "dim",
        F.lit(mid).alias("content_hash"),
        F.lit(run_id).alias("run_id"),
    )
    tables.replace(spark, db, tables.ITEM_EMBEDDINGS, rows, "modality = 'behaviour'")
    vectors.unpersist()
    transactions.unpersist()
    n = tables.read(spark, db, tables.ITEM_EMBEDDINGS).where("modality = 'behaviour'").count()
    seconds = time.perf_counter() - started
    report = {
        "model_id": mid,
        "transactions": int(stats["n"]),
        "customers": int(stats["customers"]),
        "articles_bought": int(stats["articles"]),
        "articles": n,
        "below_min_purchases": int(stats["articles"]) - n,
        "dim": cfg.behaviour.rank,
        "seconds": round(seconds, 2),
    }
    logger.info(
        "behaviour: ALS on %d purchases by %d customers; %d of %d bought articles have a vector "
        "(the rest were bought < %d times), %.1f s",
        report["transactions"], report["customers"], n, report["articles_bought"], cfg.behaviour.min_purchases, seconds,
    )
    return report
