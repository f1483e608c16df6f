"""The stages in order: ingest → train (image encoder) → behaviour (ALS item vectors) → embed
(text, image, metadata, fuse) → neighbours → recommend → customers → evaluate (time split,
metrics, HTML report). Behaviour, customers and evaluate skip, saying so, without transactions.

Each stage is idempotent (MERGE on keys, or one-commit replacement of what it owns), so a
rerun on the same inputs leaves the same tables. The run's report (counts and seconds per
stage) goes to ``runs``, and every numeric figure in it to ``metrics``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from recsys import tables
from recsys.behaviour import embed_behaviour
from recsys.config import Config
from recsys.customers import recommend_customers
from recsys.embed import embed_image, embed_metadata, embed_text, fuse
from recsys.evaluate import evaluate
from recsys.ingest import ingest
from recsys.recommend import current_model_ids, neighbours, recommend
from recsys.runs import record_run
from recsys.training import resolve_image_weights, train

logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = (
    "ingest", "train", "behaviour", "embed", "neighbours", "recommend", "customers", "evaluate",
)


def default_run_id(run_date: dt.date | None = None) -> str:
    """``run-<date>``: reruns on the same day replace that day's run (idempotent)."""
    return f"run-{(run_date or dt.datetime.now(dt.timezone.utc).date()).isoformat()}"


def embed(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Embed stage: text and image (incremental), metadata, then the fused vector.

    Raises:
        FileNotFoundError: ``image.weights`` is ``trained``, articles have images, and no
            checkpoint was trained (the train stage is off or has not run).
    """
    report: dict[str, Any] = {}
    model_ids: dict[str, str] = {}
    if cfg.text.enabled:
        report["text"] = embed_text(spark, cfg, run_id)
        model_ids["text"] = report["text"]["model_id"]
    if cfg.image.enabled:
        has_images = bool(
            tables.read(spark, cfg.data.database, tables.ARTICLES).where(F.col("image_path").isNotNull()).limit(1).count()
        )
        if has_images:
            report["image"] = embed_image(spark, cfg, run_id, resolve_image_weights(cfg))
            model_ids["image"] = report["image"]["model_id"]
        else:
            logger.info("embed image: no article has an image, skipped")
    if cfg.metadata.enabled:
        report["metadata"] = embed_metadata(spark, cfg, run_id)
        model_ids["metadata"] = report["metadata"]["model_id"]
    for modality, mid in current_model_ids(spark, cfg).items():
        if modality == "behaviour" and cfg.behaviour.enabled:
            model_ids.setdefault(modality, mid)
    report["fused"] = fuse(spark, cfg, run_id, model_ids)
    return report


STAGE_FUNCTIONS: dict[str, Callable[[SparkSession, Config, str], dict[str, Any]]] = {
    "ingest": ingest,
    "train": train,
    "behaviour": embed_behaviour,
    "embed": embed,
    "neighbours": neighbours,
    "recommend": recommend,
    "customers": recommend_customers,
    "evaluate": evaluate,
}


def run(spark: SparkSession, cfg: Config, run_id: str, stages: Sequence[str] = STAGES) -> dict[str, Any]:
    """Run ``stages`` in order and record the run.

    Args:
        spark: the session.
        cfg: the validated configuration.
        run_id: written on every output row.
        stages: a subsequence of :data:`STAGES`.

    Returns:
        The report: per stage its own report plus ``seconds``.

    Raises:
        ValueError: an unknown stage name. A failing stage's error propagates after the run is
            recorded with status ``failed``.
    """
    unknown = [s for s in stages if s not in STAGE_FUNCTIONS]
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
            result = STAGE_FUNCTIONS[stage](spark, cfg, run_id)
            result["seconds"] = round(time.perf_counter() - t0, 2)
            report[stage] = result
            logger.info("stage %s: done in %.1f s", stage, result["seconds"])
        status = "succeeded"
    finally:
        record_run(spark, cfg, run_id, stages, started, status, report)
    return report
