"""Behaviour stage: item vectors from purchases (implicit ALS, :mod:`recsys.behaviour`) into ``item_embeddings``."""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from recsys import state, tables
from recsys.behaviour import als_item_vectors, behaviour_model_id
from recsys.config import Config

logger = logging.getLogger(__name__)

STAGE = "behaviour"


def run(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Behaviour stage: ALS item vectors from ``transactions`` into ``item_embeddings``.

    Replaces every ``modality = 'behaviour'`` row in one commit. Skips (and says so) when the
    stage is off, when there are no transactions (e.g. the Fashion Product sample), and when the
    last fit had the same settings and its newest purchase is less than ``behaviour.refit_days``
    before the newest purchase now: a refit moves every factor, so every behaviour and fused
    vector and every list would change; daily purchases wait for the weekly refit.

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
    settings = {"behaviour": state.fingerprint(cfg.behaviour.model_dump(exclude={"refit_days"})),
                "last_purchase": str(stats["last"])}
    last = state.consumed(spark, db, STAGE)
    fitted_to = last.fingerprints.get("last_purchase")
    if (fitted_to and last.fingerprints.get("behaviour") == settings["behaviour"] and cfg.behaviour.refit_days
            and (stats["last"] - dt.date.fromisoformat(fitted_to)).days < cfg.behaviour.refit_days
            and tables.read(spark, db, tables.ITEM_EMBEDDINGS).where("modality = 'behaviour'").limit(1).count()):
        transactions.unpersist()
        tables.delete_removed_vectors(spark, db, "behaviour")  # removed articles leave before the refit
        reason = (f"fitted by run {last.run_id} on purchases to {fitted_to}; newest purchase {stats['last']} "
                  f"(behaviour.refit_days {cfg.behaviour.refit_days})")
        logger.info("behaviour: skipped, %s", reason)
        return {"skipped": reason}
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
    state.record(spark, db, STAGE, run_id, {}, settings)
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
