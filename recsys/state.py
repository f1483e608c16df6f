"""Change tracking: what each stage consumed when it last ran (``stage_state``).

A stage records the Delta version of each input table it read (taken before it read them) and a
fingerprint of the settings it ran with. On its next run it compares: an unchanged input needs no
work; a changed one is read as the difference between the recorded version and the current one
(Delta time travel, ``VERSION AS OF``; `Delta docs
<https://docs.delta.io/latest/delta-batch.html#query-an-older-snapshot-of-a-table-time-travel>`_).
A recorded version that ``VACUUM`` has removed, or a missing record, means a full recompute.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys import tables

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Consumed:
    """What a stage consumed on its last run: input table → Delta version, settings → fingerprint."""

    versions: dict[str, int] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None


def table_version(spark: SparkSession, database: str, spec: tables.TableSpec) -> int:
    """The current Delta version of a table (its latest commit)."""
    row = tables.first_row(DeltaTable.forName(spark, tables.qualified(database, spec)).history(1))
    return int(row["version"])


def fingerprint(settings: Any) -> str:
    """SHA-256 (hex) of ``settings`` as canonical JSON (a pydantic model, dict or value)."""
    value = settings.model_dump(mode="json") if hasattr(settings, "model_dump") else settings
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def consumed(spark: SparkSession, database: str, stage: str) -> Consumed:
    """What ``stage`` recorded on its last run (empty when it never ran)."""
    rows = tables.read(spark, database, tables.STAGE_STATE).where(F.col("stage") == stage).collect()
    return Consumed(
        {r["input"]: int(r["version"]) for r in rows if r["version"] is not None},
        {r["input"]: r["fingerprint"] for r in rows if r["fingerprint"] is not None},
        rows[0]["run_id"] if rows else None,
    )


def record(
    spark: SparkSession, database: str, stage: str, run_id: str, versions: dict[str, int],
    fingerprints: dict[str, str] | None = None,
) -> None:
    """Replace ``stage``'s record with these inputs, in one Delta commit."""
    rows: list[tuple[str, str, int | None, str | None, str]] = [
        (stage, name, int(v), None, run_id) for name, v in sorted(versions.items())
    ]
    rows += [(stage, name, None, fp, run_id) for name, fp in sorted((fingerprints or {}).items())]
    df = spark.createDataFrame(
        rows, "stage string, input string, version long, fingerprint string, run_id string"
    ).withColumn("recorded_at", F.current_timestamp())
    tables.replace(spark, database, tables.STAGE_STATE, df, f"stage = {tables.sql_string(stage)}")


def as_of(spark: SparkSession, database: str, spec: tables.TableSpec, version: int) -> DataFrame | None:
    """The table as it was at ``version``, or ``None`` when that version can no longer be read
    (its files were vacuumed, or the table was recreated)."""
    name = tables.qualified(database, spec)
    try:
        df = spark.sql(f"SELECT * FROM {name} VERSION AS OF {int(version)}")
        df.limit(1).collect()  # a vacuumed version fails here, not later inside a stage
        return df
    except Exception as err:  # noqa: BLE001 - Spark raises several kinds for a missing version
        logger.info("%s version %d cannot be read any more (%s): full recompute", name, version,
                    str(err).splitlines()[0][:200])
        return None


NO_OP_OPERATIONS = frozenset({"OPTIMIZE", "VACUUM START", "VACUUM END", "SET TBLPROPERTIES", "ADD COLUMNS"})
MERGE_ROW_METRICS = ("numTargetRowsInserted", "numTargetRowsUpdated", "numTargetRowsDeleted")


def versions(spark: SparkSession, database: str, specs: tuple[tables.TableSpec, ...]) -> dict[str, int]:
    """The current Delta version of each table, by table name."""
    return {spec.name: table_version(spark, database, spec) for spec in specs}


def data_changed(spark: SparkSession, database: str, spec: tables.TableSpec, since: int) -> bool:
    """Whether any commit after version ``since`` changed the table's rows.

    Read from the Delta log (``DESCRIBE HISTORY``): OPTIMIZE, VACUUM and schema commits change no
    rows; a MERGE whose metrics count no row inserted, updated or deleted (a rerun on the same
    input) changed none either. Any other commit counts as a change, and so does a history that
    no longer reaches back to ``since`` (log retention).
    """
    rows = (
        DeltaTable.forName(spark, tables.qualified(database, spec)).history()
        .where(F.col("version") > since).select("version", "operation", "operationMetrics").collect()
    )
    current = table_version(spark, database, spec)
    if current > since and (len(rows) != current - since):
        return True
    for row in rows:
        if row["operation"] in NO_OP_OPERATIONS:
            continue
        metrics = row["operationMetrics"] or {}
        if row["operation"] == "MERGE" and all(int(metrics.get(key, "1")) == 0 for key in MERGE_ROW_METRICS):
            continue
        return True
    return False


def unchanged_since_last_run(
    spark: SparkSession, database: str, stage: str, watched: tuple[tables.TableSpec, ...], settings: dict[str, str],
) -> str | None:
    """The ``run_id`` of ``stage``'s last run when none of the ``watched`` tables' rows changed
    since it recorded them (:func:`data_changed`) and it ran with the same ``settings``
    fingerprints; ``None`` when the stage has work to do."""
    last = consumed(spark, database, stage)
    if last.run_id is None or last.fingerprints != settings:
        return None
    for spec in watched:
        if spec.name not in last.versions or data_changed(spark, database, spec, last.versions[spec.name]):
            return None
    return last.run_id
