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
from recsys.sources.base import ROW, FileReport, SourceError, SourceRead

logger = logging.getLogger(__name__)


def content_hash(*columns: str) -> F.Column:
    """sha256 (hex) of the JSON of ``columns``: changes exactly when one of them does."""
    return F.sha2(F.to_json(F.struct(*columns)), 256)


def _quarantine(spark: SparkSession, cfg: Config, run_id: str, rejected: list[tuple[str, DataFrame]]) -> None:
    """The rejects of the source files become this run's ingest quarantine rows for those files,
    in one commit: new ones are inserted, unchanged ones kept as they were, and rows of an
    earlier attempt of the same run that are no longer rejected are deleted.

    Args:
        rejected: ``(file, rejects)`` per source file; rejects are ``(source, row, record, reason)``.
    """
    rows = None
    for _, df in rejected:
        part = df.select(
            F.lit(run_id).alias("run_id"),
            "source",
            "row",
            "record",
            "reason",
            F.lit("ingest").alias("stage"),
            F.current_timestamp().alias("quarantined_at"),
        )
        rows = part if rows is None else rows.unionByName(part)
    if rows is None:
        return
    files = ", ".join(tables.sql_string(source) for source, _ in rejected)
    scope = f"t.run_id = {tables.sql_string(run_id)} AND t.stage = 'ingest' AND t.source IN ({files})"
    tables.merge(spark, cfg.data.database, tables.QUARANTINE, rows, only_changed=True, delete_missing=scope)


def _write_articles(spark: SparkSession, cfg: Config, run_id: str, articles: DataFrame, source: str) -> None:
    canonical = [f.name for f in tables.ARTICLES.schema.fields][:10]
    rows = articles.select(
        *canonical,
        F.lit(source).alias("source"),
        content_hash(*canonical).alias("content_hash"),
        F.current_timestamp().alias("ingested_at"),
        F.lit(run_id).alias("run_id"),
    )
    deletion_guard(spark, cfg, rows, source)
    target = DeltaTable.forName(spark, tables.qualified(cfg.data.database, tables.ARTICLES))
    (
        target.alias("t")
        .merge(tables.conform(rows, tables.ARTICLES).alias("s"), "t.article_id = s.article_id")
        .whenMatchedUpdateAll(condition="t.content_hash <> s.content_hash")
        .whenNotMatchedInsertAll()
        .whenNotMatchedBySourceDelete()
        .execute()
    )


def deletion_guard(spark: SparkSession, cfg: Config, accepted: DataFrame, source: str) -> None:
    """Stop before ``articles`` loses more than ``ingest.max_deletion_share`` of its rows.

    ``articles`` mirrors the source file, so an article missing from the file is deleted. A
    truncated or partly written file would delete much of the catalogue (and, through the later
    stages, its embeddings and lists); unless ``ingest.allow_mass_deletion`` is set for the run,
    such a file stops it before anything is written.

    Args:
        accepted: the file's accepted rows (``article_id``).
        source: the file, for the message.

    Raises:
        SourceError: the deletion share is exceeded, naming the file, the counts and the setting.
    """
    settings = cfg.ingest
    if settings.allow_mass_deletion:
        return
    current = tables.read(spark, cfg.data.database, tables.ARTICLES).select("article_id")
    incoming = accepted.select("article_id").distinct().withColumn("_kept", F.lit(True))
    stats = tables.first_row(current.join(incoming, "article_id", "left").agg(
        F.count(F.lit(1)).alias("held"), F.count(F.when(F.col("_kept").isNull(), 1)).alias("deleting")))
    held, deleting = int(stats["held"]), int(stats["deleting"])
    if held and deleting / held > settings.max_deletion_share:
        raise SourceError(
            f"{source}: would delete {deleting:,} of the {held:,} articles in {cfg.data.database}.articles "
            f"({deleting / held:.1%}, more than ingest.max_deletion_share {settings.max_deletion_share:.0%}); is the "
            "file truncated? Nothing was written. If the deletion is intended, rerun with "
            "--set ingest.allow_mass_deletion=true"
        )
    if deleting:
        logger.info("ingest %s: %d of %d articles are no longer in the file and will be deleted", source, deleting, held)


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


def run(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Read the configured source into the Delta tables.

    Nothing is lost without notice: after the writes, one aggregate per table counts the rows
    each write committed (the articles ``articles`` holds, the file's customers ``customers``
    holds, the transactions in the file's date range, and this run's quarantine rows of the
    file), and every file must satisfy ``input lines = committed rows + quarantined rows``.

    Args:
        spark: the session.
        cfg: ``cfg.data.source`` picks the adapter (``hm`` or ``fashion_products``) and
            ``cfg.data.path`` the folder.
        run_id: written on every row.

    Returns:
        The stage report: ``files``, a list of ``{source, input, accepted, quarantined}``
        (``accepted`` and ``quarantined`` as committed to the tables), and ``articles``, the
        row count of the table after the write.

    Raises:
        SourceError: a file is missing or lacks a required column, or ``articles.csv`` would
            delete more than ``ingest.max_deletion_share`` of the catalogue (:func:`deletion_guard`).
        RuntimeError: a file's input lines are not all in its table or in quarantine after the
            writes, naming the file and the counts (rows were lost).
    """
    tables.ensure_tables(spark, cfg.data.database)
    root = cfg.data.path.rstrip("/")
    db = cfg.data.database
    reads: list[SourceRead] = []
    committed: list[tuple[FileReport, str, int]] = []  # (parse counts, table, rows the table holds)
    try:
        read = (hm if cfg.data.source == "hm" else fashion_products).read_articles(spark, root)
        reads.append(read)
        source = read.report.source
        rejects = [(source, read.rejected)]
        _write_articles(spark, cfg, run_id, read.accepted, f"{cfg.data.source}:{source}")
        # articles mirrors the file: the table holds exactly the accepted rows
        n_articles = tables.read(spark, db, tables.ARTICLES).count()
        committed.append((read.report, "articles", n_articles))

        if cfg.data.source == "hm":
            read = hm.read_customers(spark, root)
            reads.append(read)
            rejects.append((read.report.source, read.rejected))
            tables.merge(spark, db, tables.CUSTOMERS, read.accepted.select(
                "*", F.current_timestamp().alias("ingested_at"), F.lit(run_id).alias("run_id")), only_changed=True)
            held = tables.read(spark, db, tables.CUSTOMERS).join(
                read.accepted.select("customer_id"), "customer_id", "left_semi").count()
            committed.append((read.report, "customers", held))
            committed.append(_ingest_transactions(spark, cfg, run_id, root, reads, rejects))
        _quarantine(spark, cfg, run_id, rejects)

        quarantined: dict[str, int] = dict(
            tables.read(spark, db, tables.QUARANTINE)
            .where((F.col("run_id") == run_id) & (F.col("stage") == "ingest"))
            .groupBy("source").count().collect()
        )
    finally:
        for r in reads:
            r.release()
    reports: list[FileReport] = []
    for parsed, table, held in committed:
        report = FileReport(parsed.source, parsed.input, held, int(quarantined.get(parsed.source, 0)))
        reports.append(report)
        logger.info("ingest %s: input %d = %s %d + quarantined %d", report.source, report.input, table,
                    report.accepted, report.quarantined)
        if not report.balanced:
            raise RuntimeError(
                f"ingest {report.source}: {report.input} input rows but {report.accepted} committed to {db}.{table} "
                f"+ {report.quarantined} in {db}.quarantine ({parsed.accepted} accepted and {parsed.quarantined} "
                f"rejected when parsed); {report.input - report.accepted - report.quarantined} row(s) unaccounted for"
            )
    return {"files": [asdict(r) for r in reports], "articles": n_articles}


def _ingest_transactions(
    spark: SparkSession, cfg: Config, run_id: str, root: str, reads: list[SourceRead],
    rejects: list[tuple[str, DataFrame]],
) -> tuple[FileReport, str, int]:
    """Transactions whose article and customer exist replace the file's date range; the others
    join ``rejects``. Returns the parse counts and the rows the table holds in that range."""
    db = cfg.data.database
    read = hm.read_transactions(spark, root)
    reads.append(read)
    typed = read.accepted.withColumn(ROW, F.col("row_number"))
    typed, bad_article = _unknown_reference(typed, "article_id", tables.read(spark, db, tables.ARTICLES), read.report.source)
    typed, bad_customer = _unknown_reference(typed, "customer_id", tables.read(spark, db, tables.CUSTOMERS), read.report.source)
    typed = typed.persist()
    read.cached.append(typed)
    rejects.append((read.report.source, read.rejected.unionByName(bad_article).unionByName(bad_customer)))
    bounds = tables.first_row(typed.agg(F.min("t_dat").alias("lo"), F.max("t_dat").alias("hi")))
    if bounds["lo"] is None:
        return read.report, "transactions", 0
    in_range = f"t_dat >= '{bounds['lo']}' AND t_dat <= '{bounds['hi']}'"
    tables.replace(spark, db, tables.TRANSACTIONS, typed.drop(ROW).withColumn("run_id", F.lit(run_id)), in_range)
    return read.report, "transactions", tables.read(spark, db, tables.TRANSACTIONS).where(in_range).count()
