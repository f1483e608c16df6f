"""Run bookkeeping: a run's row in ``runs`` and its figures in ``metrics``.

Kept apart from :mod:`recsys.pipeline` so that a stage (``evaluate``) can flatten its own report
without importing the pipeline that imports it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, StringType, StructField, StructType

from recsys import tables
from recsys.config import Config


def default_run_id(run_date: dt.date | None = None) -> str:
    """``run-<date>``: reruns on the same day replace that day's run (idempotent)."""
    return f"run-{(run_date or dt.datetime.now(dt.timezone.utc).date()).isoformat()}"


def run_date(run_id: str) -> dt.date:
    """The day a run is for: the ``YYYY-MM-DD`` that ends ``run_id`` (as :func:`default_run_id`
    writes it), else today (UTC). Source rows dated later than it are not accepted."""
    found = _RUN_DATE.search(run_id)
    if found:
        try:
            return dt.date.fromisoformat(found.group(1))
        except ValueError:
            pass
    return dt.datetime.now(dt.timezone.utc).date()


_RUN_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})$")


def flatten_report(prefix: str, value: Any, out: dict[str, float]) -> None:
    """Every number in a (nested) stage report into ``out`` as ``prefix.key.subkey: value``;
    lists of ``{source: ...}`` entries are keyed by the source's file name."""
    if isinstance(value, bool):
        out[prefix] = float(value)
    elif isinstance(value, (int, float)):
        out[prefix] = float(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            flatten_report(f"{prefix}.{key}", item, out)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and "source" in item:
                name = str(item["source"]).rstrip("/").rsplit("/", 1)[-1]
                flatten_report(f"{prefix}.{name}", {k: v for k, v in item.items() if k != "source"}, out)


def record_run(
    spark: SparkSession, cfg: Config, run_id: str, stages: Sequence[str], started: dt.datetime,
    status: str, report: dict[str, Any],
) -> None:
    """Upsert the run into ``runs`` and its numeric figures into ``metrics``."""
    db = cfg.data.database
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    run = spark.createDataFrame(
        [(run_id, started, now, status, ",".join(stages), cfg.model_dump_json(), json.dumps(report, default=str))],
        "run_id string, started_at timestamp, ended_at timestamp, status string, stages string, config string, report string",
    )
    tables.merge(spark, db, tables.RUNS, run)
    figures: dict[str, float] = {}
    for stage, value in report.items():
        flatten_report(stage, value, figures)
    if figures:
        schema = StructType(
            [StructField("name", StringType()), StructField("value", DoubleType()), StructField("stage", StringType())]
        )
        rows = [(name, value, name.split(".", 1)[0]) for name, value in sorted(figures.items())]
        metrics = spark.createDataFrame(rows, schema).select(
            F.lit(run_id).alias("run_id"), "name", "value", "stage",
            F.lit("recorded by the pipeline from the stage report").alias("detail"),
            F.current_timestamp().alias("recorded_at"),
        )
        tables.merge(spark, db, tables.METRICS, metrics)
