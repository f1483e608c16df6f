"""Customers stage: ``customer_recommendations``, the top-K per customer with a reason (:func:`recsys.customers.customer_top_k`)."""

from __future__ import annotations

import logging
import time
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from recsys import state, tables
from recsys.config import Config
from recsys.customers import customer_top_k

logger = logging.getLogger(__name__)

STAGE = "customers"
INPUTS = (tables.CUSTOMERS, tables.TRANSACTIONS, tables.ARTICLES, tables.ITEM_RECOMMENDATIONS)
OUTPUTS = (tables.CUSTOMER_RECOMMENDATIONS,)


def run(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Customers stage: ``customer_recommendations`` for every customer in ``customers``.

    Uses all of ``transactions`` and the served ``item_recommendations``. The lists are checked
    (every customer has K) before one MERGE makes the table equal to them, writing only the rows
    that differ (a customer whose list changed, a new customer, the rows of one who left); a
    failing run leaves the previous lists in place. Skips (and says so) when the stage is off or there are no
    customers or purchases, and when none of its inputs' rows (nor its own table's) changed since
    its last run with the same ``customers`` settings (:func:`recsys.state.unchanged_since_last_run`).

    Returns:
        ``{skipped}`` or ``{customers, rows, customers_short, reasons: {similar_to, repurchase,
        popular}, seconds}``; ``customers_short`` counts customers with fewer than K rows (only
        when the catalogue has fewer than K articles).

    Raises:
        RuntimeError: a customer got fewer than K rows although the catalogue has K articles
            (nothing is written).
    """
    db = cfg.data.database
    if not cfg.customers.enabled:
        logger.info("customers: off (customers.enabled: false), skipped")
        return {"skipped": "customers.enabled is false"}
    started = time.perf_counter()
    consumed = state.versions(spark, db, INPUTS)
    settings = {"customers": state.fingerprint(cfg.customers)}
    last = state.unchanged_since_last_run(spark, db, STAGE, (*INPUTS, *OUTPUTS), settings)
    if last is not None:
        logger.info("customers: inputs unchanged since run %s, skipped", last)
        return {"skipped": f"inputs unchanged since run {last}"}
    customers = tables.read(spark, db, tables.CUSTOMERS).select("customer_id")
    transactions = tables.read(spark, db, tables.TRANSACTIONS).select("t_dat", "customer_id", "article_id")
    n_customers = customers.count()
    if n_customers == 0 or transactions.limit(1).count() == 0:
        logger.info("customers: no customers or no transactions, skipped")
        return {"skipped": "no customers or no transactions"}
    articles = tables.read(spark, db, tables.ARTICLES).select("article_id")
    item_lists = tables.read(spark, db, tables.ITEM_RECOMMENDATIONS).select(
        "article_id", F.col("recommended_id").alias("neighbour_id"), "score"
    )
    recs = customer_top_k(transactions, item_lists, customers, articles, cfg.customers).persist()
    try:
        # checked before the commit: a run that fails here publishes nothing
        per_customer = recs.groupBy("customer_id").count()
        k = min(cfg.customers.k, articles.count())
        stats = tables.first_row(
            per_customer.agg(F.count(F.lit(1)).alias("customers"), F.sum("count").alias("rows"),
                             F.sum((F.col("count") < k).cast("int")).alias("short"))
        )
        missing = n_customers - int(stats["customers"] or 0)
        if missing or stats["short"]:
            raise RuntimeError(
                f"customers: {missing} customers got no list and {stats['short']} fewer than {k}; expected {k} each; "
                f"{db}.customer_recommendations was left as it was"
            )
        reasons: dict[str, int] = dict(
            recs.groupBy(F.split("reason", ":")[0].alias("source")).count().select("source", "count").collect()
        )
        tables.merge(spark, db, tables.CUSTOMER_RECOMMENDATIONS, recs.withColumn("run_id", F.lit(run_id)),
                     only_changed=True, delete_missing="true")
    finally:
        recs.unpersist()
    state.record(spark, db, STAGE, run_id, {**consumed, **state.versions(spark, db, OUTPUTS)}, settings)
    seconds = time.perf_counter() - started
    by_reason = {r: int(reasons.get(r, 0)) for r in ("similar_to", "repurchase", "popular")}
    report: dict[str, Any] = {
        "customers": int(stats["customers"]),
        "rows": int(stats["rows"]),
        "customers_short": int(stats["short"]),
        "reasons": by_reason,
        "seconds": round(seconds, 2),
    }
    logger.info(
        "customers: %d customers × %d = %d rows (similar_to %d, repurchase %d, popular %d), %.1f s",
        report["customers"], k, report["rows"], *by_reason.values(), seconds,
    )
    return report
