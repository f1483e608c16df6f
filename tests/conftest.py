"""Shared fixtures: one small local Spark session (Delta on) for the whole test run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("warehouse")


@pytest.fixture(scope="session")
def spark(warehouse: Path) -> Iterator[object]:
    """``local[2]``, 2 shuffle partitions, UI off, Delta on, warehouse under a tmp dir."""
    from recsys.config import load_config
    from recsys.session import build_spark

    cfg = load_config(
        "local",
        [
            "spark.master=local[2]",
            "spark.shuffle_partitions=2",
            "spark.driver_memory=3g",
            f"spark.warehouse_dir={warehouse}",
            "spark.conf={spark.ui.enabled: 'false', spark.sql.adaptive.coalescePartitions.enabled: 'true'}",
        ],
    )
    session = build_spark(cfg)
    yield session
    session.stop()


def test_config(warehouse: Path, database: str, *overrides: str) -> object:
    """A config for the test session: its warehouse, its own database, test-size settings."""
    from recsys.config import load_config

    return load_config(
        "local",
        [
            "spark.master=local[2]",
            "spark.shuffle_partitions=2",
            f"spark.warehouse_dir={warehouse}",
            f"data.database={database}",
            "knn.recall_sample=100",
            *overrides,
        ],
    )


test_config.__test__ = False  # type: ignore[attr-defined]


def hm_data() -> Path:
    """The H&M folder under ../shared/data, or skip with the reason."""
    path = SHARED_DATA / "hm"
    if not (path / "articles.csv").is_file():
        pytest.skip(f"H&M data not found at {path} (set RECSYS_SHARED_DATA or put ../shared/data beside the repo)")
    return path
