"""The stages in order: ingest → train (image encoder) → behaviour (ALS item vectors) → embed
(text, image, metadata, fuse) → neighbours → recommend → customers → evaluate (time split,
metrics, HTML report). Behaviour, customers and evaluate skip, saying so, without transactions;
``maintain`` (OPTIMIZE, VACUUM) runs when asked. Each stage lives in :mod:`recsys.stages`.

Each stage is idempotent (MERGE on keys, or one-commit replacement of what it owns), so a
rerun on the same inputs leaves the same tables. The run's report (counts and seconds per
stage) goes to ``runs``, and every numeric figure in it to ``metrics``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from typing import Any

from pyspark.sql import SparkSession

from recsys import tables
from recsys.config import Config
from recsys.runlog import record_run
from recsys.stages import STAGES, stage_function

logger = logging.getLogger(__name__)

RUN_STAGES: tuple[str, ...] = tuple(s for s in STAGES if s not in ("evaluate", "maintain"))
"""What ``recsys run`` (``jobs/refresh.py``) runs: the daily refresh. ``evaluate`` runs when asked
(``recsys evaluate``, or ``recsys run --evaluate``), ``maintain`` on its own schedule."""


def run(spark: SparkSession, cfg: Config, run_id: str, stages: Sequence[str] = RUN_STAGES) -> dict[str, Any]:
    """Run ``stages`` in order and record the run.

    Args:
        spark: the session.
        cfg: the validated configuration.
        run_id: written on every output row.
        stages: a subsequence of :data:`recsys.stages.STAGES`.

    Returns:
        The report: per stage its own report plus ``seconds``.

    Raises:
        ValueError: an unknown stage name. A failing stage's error propagates after the run is
            recorded with status ``failed``.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    tables.ensure_tables(spark, cfg.data.database)
    started = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    report: dict[str, Any] = {}
    status = "failed"
    try:
        for stage in stages:
            t0 = time.perf_counter()
            logger.info("stage %s: start (run %s)", stage, run_id)
            result = stage_function(stage)(spark, cfg, run_id)
            result["seconds"] = round(time.perf_counter() - t0, 2)
            report[stage] = result
            logger.info("stage %s: done in %.1f s", stage, result["seconds"])
        status = "succeeded"
    finally:
        record_run(spark, cfg, run_id, stages, started, status, report)
    return report
