"""Ingest stage: source files → ``articles`` (``customers``, ``transactions``) + ``quarantine``.

Whole-file problems stop the run with a :class:`~recsys.sources.base.SourceError` naming file
and column. Row problems go to ``quarantine`` with the raw record and the reason; every file
reports ``input = accepted + quarantined``. ``articles`` mirrors the source: changed rows are
updated (new ``content_hash``), unchanged rows are left as they are, and articles no longer in
the source are deleted (unless that would be more than ``ingest.max_deletion_share`` of them).
``customers`` rows are updated only when a value changed. ``transactions`` is written by day:
only the days whose rows differ from the table's are replaced, so a new day appends a day.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict
from typing import Any

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys import tables
from recsys.config import Config
from recsys.runlog import run_date
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
    held = tables.read(spark, cfg.data.database, tables.QUARANTINE).alias("t").where(scope)
    if not rows.limit(1).count() and not held.limit(1).count():
        return  # nothing rejected now or by an earlier attempt of this run: no commit
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
    if not deletion_guard(spark, cfg, rows, source):
        logger.info("ingest %s: no article new, changed or removed", source)
        return
    target = DeltaTable.forName(spark, tables.qualified(cfg.data.database, tables.ARTICLES))
    (
        target.alias("t")
        .merge(tables.conform(rows, tables.ARTICLES).alias("s"), "t.article_id = s.article_id")
        .whenMatchedUpdateAll(condition="t.content_hash <> s.content_hash")
        .whenNotMatchedInsertAll()
        .whenNotMatchedBySourceDelete()
        .execute()
    )


def deletion_guard(spark: SparkSession, cfg: Config, accepted: DataFrame, source: str) -> int:
    """Stop before ``articles`` loses more than ``ingest.max_deletion_share`` of its rows.

    ``articles`` mirrors the source file, so an article missing from the file is deleted. A
    truncated or partly written file would delete much of the catalogue (and, through the later
    stages, its embeddings and lists); unless ``ingest.allow_mass_deletion`` is set for the run,
    such a file stops it before anything is written.

    Args:
        accepted: the file's accepted rows (``article_id``, ``content_hash``).
        source: the file, for the message.

    Returns:
        The number of articles the write would insert, update or delete (0: nothing to write).

    Raises:
        SourceError: the deletion share is exceeded, naming the file, the counts and the setting.
    """
    settings = cfg.ingest
    current = tables.read(spark, cfg.data.database, tables.ARTICLES).select("article_id", F.col("content_hash").alias("_held"))
    incoming = accepted.select("article_id", F.col("content_hash").alias("_new"))
    stats = tables.first_row(current.join(incoming, "article_id", "full_outer").agg(
        F.count(F.col("_held")).alias("held"),
        F.count(F.when(F.col("_new").isNull(), 1)).alias("deleting"),
        F.count(F.when(F.col("_held").isNull() | (F.col("_held") != F.col("_new")), 1)).alias("writing")))
    held, deleting = int(stats["held"]), int(stats["deleting"])
    if held and deleting / held > settings.max_deletion_share and not settings.allow_mass_deletion:
        raise SourceError(
            f"{source}: would delete {deleting:,} of the {held:,} articles in {cfg.data.database}.articles "
            f"({deleting / held:.1%}, more than ingest.max_deletion_share {settings.max_deletion_share:.0%}); is the "
            "file truncated? Nothing was written. If the deletion is intended, rerun with "
            "--set ingest.allow_mass_deletion=true"
        )
    if deleting:
        logger.info("ingest %s: %d of %d articles are no longer in the file and will be deleted", source, deleting, held)
    return deleting + int(stats["writing"])


def _unknown_reference(df: DataFrame, column: str, known: DataFrame, path: str) -> tuple[DataFrame, DataFrame]:
    """Split ``df`` (parsed rows with ``_row``) on whether ``column`` exists in ``known``."""
    flagged = df.join(known.select(column).withColumn("_known", F.lit(True)), column, "left")
    bad = flagged.where(F.col("_known").isNull()).select(*df.columns)
    return flagged.where(F.col("_known").isNotNull()).drop("_known"), _rejects(
        bad, path, F.concat(F.lit(f"unknown {column} "), F.col(column)))


def _rejects(bad: DataFrame, path: str, reason: Column) -> DataFrame:
    """``bad`` (parsed rows with ``_row``) as quarantine records: ``(source, row, record, reason)``,
    the record being the parsed row as JSON."""
    return bad.select(
        F.lit(path).alias("source"),
        F.col(ROW).alias("row"),
        F.to_json(F.struct(*[c for c in bad.columns if c != ROW])).alias("record"),
        reason.alias("reason"),
    )


def run(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Read the configured source into the Delta tables (which must exist:
    :func:`recsys.pipeline.run` creates them with :func:`recsys.tables.ensure_tables` first).

    Nothing is lost without notice: after the writes, one aggregate per table counts the rows
    each write committed (the articles ``articles`` holds, the file's customers ``customers``
    holds, the transactions in the file's date range, and this run's quarantine rows of the
    file), and every file must satisfy ``input lines = committed rows + quarantined rows``.

    Args:
        spark: the session.
        cfg: ``cfg.data.source`` picks the adapter (``hm`` or ``fashion_products``) and
            ``cfg.data.path`` the folder.
        run_id: written on every row; its date (:func:`recsys.runlog.run_date`) is the latest
            transaction date accepted.

    Returns:
        The stage report: ``files``, a list of ``{source, input, accepted, quarantined}``
        (``accepted`` and ``quarantined`` as committed to the tables), ``articles``, the
        row count of the table after the write, and ``transaction_days_written``, the days of
        ``transactions`` replaced because the file's rows for them differ (0 on a rerun).

    Raises:
        SourceError: a file is missing or lacks a required column, or ``articles.csv`` would
            delete more than ``ingest.max_deletion_share`` of the catalogue (:func:`deletion_guard`).
        RuntimeError: a file's input lines are not all in its table or in quarantine after the
            writes, naming the file and the counts (rows were lost).
    """
    root = cfg.data.path.rstrip("/")
    db = cfg.data.database
    reads: list[SourceRead] = []
    committed: list[tuple[FileReport, str, int]] = []  # (parse counts, table, rows the table holds)
    days_written = 0
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
            parsed, held, days_written = _ingest_transactions(spark, cfg, run_id, root, reads, rejects)
            committed.append((parsed, "transactions", held))
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
    return {"files": [asdict(r) for r in reports], "articles": n_articles, "transaction_days_written": days_written}


def _ingest_transactions(
    spark: SparkSession, cfg: Config, run_id: str, root: str, reads: list[SourceRead],
    rejects: list[tuple[str, DataFrame]],
) -> tuple[FileReport, int, int]:
    """Transactions whose article and customer exist and whose day is not after the run's
    replace the days of the file's date range whose rows differ from the table's (a new day is
    appended; unchanged days are not rewritten); the others join ``rejects``.

    Returns:
        The parse counts, the rows the table holds in the file's date range, and the number of
        days written.
    """
    db = cfg.data.database
    read = hm.read_transactions(spark, root)
    reads.append(read)
    source = read.report.source
    typed = read.accepted.withColumn(ROW, F.col("row_number"))
    typed, bad_article = _unknown_reference(typed, "article_id", tables.read(spark, db, tables.ARTICLES), source)
    typed, bad_customer = _unknown_reference(typed, "customer_id", tables.read(spark, db, tables.CUSTOMERS), source)
    typed, future = _after_run_date(typed, run_date(run_id), source)
    typed = typed.drop(ROW).withColumn("run_id", F.lit(run_id)).persist()
    read.cached.append(typed)
    rejects.append((source, read.rejected.unionByName(bad_article).unionByName(bad_customer).unionByName(future)))
    bounds = tables.first_row(typed.agg(F.min("t_dat").alias("lo"), F.max("t_dat").alias("hi")))
    if bounds["lo"] is None:
        return read.report, 0, 0
    in_range = f"t_dat >= '{bounds['lo']}' AND t_dat <= '{bounds['hi']}'"
    held = tables.read(spark, db, tables.TRANSACTIONS).where(in_range)
    changed = sorted(changed_days(typed, held))
    if changed:
        days = ", ".join(f"DATE'{day}'" for day in changed)
        tables.replace(spark, db, tables.TRANSACTIONS, typed.where(f"t_dat IN ({days})"), f"t_dat IN ({days})")
        logger.info("ingest %s: %d day(s) written, %s to %s", source, len(changed), changed[0], changed[-1])
    return read.report, tables.read(spark, db, tables.TRANSACTIONS).where(in_range).count(), len(changed)


def changed_days(incoming: DataFrame, held: DataFrame) -> list[dt.date]:
    """The days whose transactions differ between ``incoming`` and ``held``.

    Each day is summarised by its row count and the sum of a 64-bit hash (xxHash64) of each
    row's data columns (``t_dat``, ``customer_id``, ``article_id``, ``row_number``, ``price``,
    ``sales_channel_id``; not ``run_id``), so a day differs when a row was added, removed or
    changed (up to a hash collision, about 2^-64 per changed day). A day present on one side
    only differs.

    Args:
        incoming: the file's accepted rows.
        held: the table's rows over the same date range.

    Returns:
        The differing days (``datetime.date``), unordered.
    """
    data = ["t_dat", "customer_id", "article_id", "row_number", "price", "sales_channel_id"]

    def summary(df: DataFrame, side: str) -> DataFrame:
        return df.groupBy("t_dat").agg(
            F.count(F.lit(1)).alias(f"{side}_rows"),
            F.sum(F.xxhash64(*data).cast("decimal(38,0)")).alias(f"{side}_hash"),
        )

    both = summary(incoming, "in").join(summary(held, "held"), "t_dat", "full_outer")
    differs = ~(F.col("in_rows").eqNullSafe(F.col("held_rows")) & F.col("in_hash").eqNullSafe(F.col("held_hash")))
    return [r["t_dat"] for r in both.where(differs).select("t_dat").collect()]


def _after_run_date(df: DataFrame, day: dt.date, path: str) -> tuple[DataFrame, DataFrame]:
    """Split ``df`` (parsed rows with ``t_dat`` and ``_row``) on whether ``t_dat`` is after ``day``,
    the run's date: a future date would move every customer's "as of" day."""
    late = F.col("t_dat") > F.lit(day.isoformat()).cast("date")
    reason = F.concat(F.lit("t_dat "), F.col("t_dat").cast("string"), F.lit(f" is after the run date {day.isoformat()}"))
    return df.where(~late), _rejects(df.where(late), path, reason)
