"""The stages, one module each, every one exposing ``run(spark, cfg, run_id) -> report``.

``ingest → train → behaviour → embed → neighbours → recommend → customers → evaluate``, and
``maintain`` (OPTIMIZE and VACUUM) on its own schedule. A stage module is imported only when it
runs (:func:`stage_function`), so light commands (``recsys sql``, ``recsys similar``) never load
torch or the encoders.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from recsys.config import Config

STAGES: tuple[str, ...] = (
    "ingest", "train", "behaviour", "embed", "neighbours", "recommend", "customers", "evaluate", "maintain",
)
"""Every stage, in the order a run takes them."""

StageFunction = Callable[["SparkSession", "Config", str], dict[str, Any]]


def stage_function(name: str) -> StageFunction:
    """``recsys.stages.<name>.run``.

    Raises:
        ValueError: an unknown stage name.
    """
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are {list(STAGES)}")
    function: StageFunction = importlib.import_module(f"recsys.stages.{name}").run
    return function
