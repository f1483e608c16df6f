"""Maintain stage: ``OPTIMIZE`` and ``VACUUM`` of every recsys table, so that a year of daily runs
does not slow reads.

A daily MERGE or ``replaceWhere`` commit adds a few small files and marks others removed; Change
Data Feed adds ``_change_data`` files. ``OPTIMIZE`` compacts the small files of each table (bin
packing, `Delta docs <https://docs.delta.io/latest/optimizations-oss.html>`_); ``VACUUM`` deletes
the files that no table version within ``maintain.retention_hours`` needs (set as each table's
``delta.deletedFileRetentionDuration``), change-data files included (`Delta docs <https://docs.delta.io/latest/delta-utility.html#remove-files-no-longer-referenced-by-a-delta-table>`_).
A retention under Delta's safety minimum of 168 hours needs
``spark.databricks.delta.retentionDurationCheck.enabled=false``, set for the stage only.
Readers are never disturbed: OPTIMIZE is its own commit of the same rows, and VACUUM keeps what
the retention window's versions reference.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from delta.tables import DeltaTable
from pyspark.sql import SparkSession

from recsys import tables
from recsys.config import Config
from recsys.session import sql_conf

logger = logging.getLogger(__name__)

SAFE_RETENTION_HOURS = 168
RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"
RETENTION_PROPERTY = "delta.deletedFileRetentionDuration"
LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"


def table_files(spark: SparkSession, name: str) -> tuple[int, int]:
    """``(files, bytes)`` of the current version of table ``name``."""
    row = tables.first_row(DeltaTable.forName(spark, name).detail())
    return int(row["numFiles"] or 0), int(row["sizeInBytes"] or 0)


def vacuum(spark: SparkSession, name: str, table: DeltaTable, retention_hours: int) -> None:
    """VACUUM ``name`` keeping ``retention_hours`` of history.

    Delta 4 ignores a retention argument other than 0 (it logs "Vacuum with retention threshold
    other than 0 hours is ignored") and reads the table property
    ``delta.deletedFileRetentionDuration`` instead, so the property is set (one commit, only
    when it differs) and VACUUM runs without an argument; 0 hours is passed as the argument.
    """
    if retention_hours == 0:
        table.vacuum(0.0)
        return
    wanted = f"interval {retention_hours} hours"
    properties = tables.first_row(table.detail())["properties"] or {}
    if properties.get(RETENTION_PROPERTY) != wanted:
        spark.sql(f"ALTER TABLE {name} SET TBLPROPERTIES ('{RETENTION_PROPERTY}' = '{wanted}')")
    table.vacuum()


def run(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """OPTIMIZE then VACUUM every table of :data:`recsys.tables.ALL_TABLES` (or those in
    ``maintain.tables``), as configured.

    Returns:
        Per table: ``files_before``, ``files_after``, ``bytes_after``, ``seconds``; or
        ``{skipped}`` when ``maintain.enabled`` is false.
    """
    settings = cfg.maintain
    if not settings.enabled:
        logger.info("maintain: off (maintain.enabled: false), skipped")
        return {"skipped": "maintain.enabled is false"}
    # VACUUM lists files with spark.sql.sources.parallelPartitionDiscovery.parallelism tasks
    # (10,000 by default: a minute per table on 2 cores); the shuffle partitions suffice
    conf = {LISTING_PARALLELISM: spark.conf.get("spark.sql.shuffle.partitions", "8") or "8"}
    if settings.retention_hours < SAFE_RETENTION_HOURS:
        conf[RETENTION_CHECK] = "false"
    chosen = [spec for spec in tables.ALL_TABLES if not settings.tables or spec.name in settings.tables]
    report: dict[str, Any] = {"retention_hours": settings.retention_hours}
    with sql_conf(spark, conf):
        for spec in chosen:
            name = tables.qualified(cfg.data.database, spec)
            started = time.perf_counter()
            before, _ = table_files(spark, name)
            table = DeltaTable.forName(spark, name)
            if settings.optimize:
                table.optimize().executeCompaction()
            if settings.vacuum:
                vacuum(spark, name, table, settings.retention_hours)
            after, size = table_files(spark, name)
            report[spec.name] = {"files_before": before, "files_after": after, "bytes_after": size,
                                 "seconds": round(time.perf_counter() - started, 2)}
            logger.info("maintain %s: %d → %d files, %.1f MB (%.1f s)", name, before, after, size / 1e6,
                        report[spec.name]["seconds"])
    return report
