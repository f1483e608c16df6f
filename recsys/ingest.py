"""Ingest stage: source files → ``articles`` (``customers``, ``transactions``) + ``quarantine``.

Whole-file problems stop the run with a :class:`~recsys.sources.base.SourceError` naming file
and column. Row problems go to ``quarantine`` with the raw record and the reason; every file
reports ``input = accepted + quarantined``. ``articles`` mirrors the source: changed rows are
updated (new ``content_hash``), unchanged rows are left as they are, and articles no longer in
the source are deleted.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys import tables
from recsys.config import Config
from recsys.sources import fashion_products, hm
from recsys.sources.base import ROW, FileReport

logger = logging.getLogger(__name__)


def content_hash(*columns: str) -> F.Column:
    """sha256 (hex) of the JSON of ``columns``: changes exactly when one of them does."""
    return F.sha2(F.to_json(F.struct(*columns)), 256)


def _quarantine(spark: SparkSession, cfg: Config, run_id: str, rejected: DataFrame, stage: str) -> None:
    rows = rejected.select(
        F.lit(run_id).alias("run_id"),
        "source",
        "row",
        "record",
        "reason",
        F.lit(stage).alias("stage"),
        F.current_timestamp().alias("quarantined_at"),
    )
    tables.merge(spark, cfg.data.database, tables.QUARANTINE, rows, insert_only=True)


def _write_articles(spark: SparkSession, cfg: Config, run_id: str, articles: DataFrame, source: str) -> None:
    canonical = [f.name for f in tables.ARTICLES.schema.fields][:10]
    rows = articles.select(
        *canonical,
        F.lit(source).alias("source"),
        content_hash(*canonical).alias("content_hash"),
        F.current_timestamp().alias("ingested_at"),
        F.lit(run_id).alias("run_id"),
    )
    target = DeltaTable.forName(spark, tables.qualified(cfg.data.database, tables.ARTICLES))
    (
        target.alias("t")
        .merge(tables.conform(rows, tables.ARTICLES).alias("s"), "t.article_id = s.article_id")
        .whenMatchedUpdateAll(condition="t.content_hash <> s.content_hash")
        .whenNotMatchedInsertAll()
        .whenNotMatchedBySourceDelete()
        .execute()
    )


def _unknown_reference(df: DataFrame, column: str, known: DataFrame, path: str) -> tuple[DataFrame, DataFrame]:
    """Split ``df`` (parsed rows with ``_row``) on whether ``column`` exists in ``known``."""
    flagged = df.join(known.select(column).withColumn("_known", F.lit(True)), column, "left")
    good = flagged.where(F.col("_known").isNotNull()).drop("_known")
    bad = flagged.where(F.col("_known").isNull()).select(
        F.lit(path).alias("source"),
        F.col(ROW).alias("row"),
        F.to_json(F.struct(*[c for c in df.columns if c != ROW])).alias("record"),
        F.concat(F.lit(f"unknown {column} "), F.col(column)).alias("reason"),
    )
    return good, bad


def ingest(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Read the configured source into the Delta tables.

    Args:
        spark: the session.
        cfg: ``cfg.data.source`` picks the adapter (``hm`` or ``fashion_products``) and
            ``cfg.data.path`` the folder.
        run_id: written on every row.

    Returns:
        The stage report: ``files``, a list of ``{source, input, accepted, quarantined}``, and
        ``articles``, the row count of the table after the write.

    Raises:
        SourceError: a file is missing or lacks a required column.
        RuntimeError: a file's counts do not add up (a bug, never expected).
    """
    tables.ensure_tables(spark, cfg.data.database)
    root = cfg.data.path.rstrip("/")
    reports: list[FileReport] = []
    db = cfg.data.database
    if cfg.data.source == "hm":
        articles, rejected, report = hm.read_articles(spark, root)
    else:
        articles, rejected, report = fashion_products.read_articles(spark, root)
    reports.append(report)
    _quarantine(spark, cfg, run_id, rejected, "ingest")
    _write_articles(spark, cfg, run_id, articles, f"{cfg.data.source}:{report.source}")

    if cfg.data.source == "hm":
        customers, rejected, report = hm.read_customers(spark, root)
        reports.append(report)
        _quarantine(spark, cfg, run_id, rejected, "ingest")
        tables.merge(spark, db, tables.CUSTOMERS, customers.select(
            "*", F.current_timestamp().alias("ingested_at"), F.lit(run_id).alias("run_id")), only_changed=True)

        transactions, rejected, report = hm.read_transactions(spark, root)
        known_articles = tables.read(spark, db, tables.ARTICLES)
        known_customers = tables.read(spark, db, tables.CUSTOMERS)
        typed = transactions.withColumn(ROW, F.col("row_number"))
        typed, bad_article = _unknown_reference(typed, "article_id", known_articles, report.source)
        typed, bad_customer = _unknown_reference(typed, "customer_id", known_customers, report.source)
        typed = typed.persist()
        unknown = bad_article.unionByName(bad_customer).persist()
        n_unknown = unknown.count()
        report = FileReport(report.source, report.input, report.accepted - n_unknown, report.quarantined + n_unknown)
        reports.append(report)
        _quarantine(spark, cfg, run_id, rejected.unionByName(unknown), "ingest")
        bounds = tables.first_row(typed.agg(F.min("t_dat").alias("lo"), F.max("t_dat").alias("hi")))
        if bounds["lo"] is not None:
            tables.replace(
                spark, db, tables.TRANSACTIONS,
                typed.drop(ROW).withColumn("run_id", F.lit(run_id)),
                f"t_dat >= '{bounds['lo']}' AND t_dat <= '{bounds['hi']}'",
            )
        typed.unpersist()
        unknown.unpersist()

    n_articles = tables.read(spark, db, tables.ARTICLES).count()
    for r in reports:
        logger.info("ingest %s: input %d = accepted %d + quarantined %d", r.source, r.input, r.accepted, r.quarantined)
    return {"files": [asdict(r) for r in reports], "articles": n_articles}
