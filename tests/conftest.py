"""Shared fixtures: one small local Spark session (Delta on) per test process, kept as it was.

- ``spark``: ``local[2]``, 2 shuffle partitions, UI off, Delta on, warehouse under a tmp dir.
  Under pytest-xdist every worker has its own; they start one after the other (a file lock),
  so two JVMs never resolve the Delta jars into the Ivy cache at once.
- Every test that uses ``spark`` gets the session's runtime settings back as they were
  (an autouse fixture), whatever the test or the code under it set.
- ``hm_data()``: the H&M folder under ``../shared/data``; without it the e2e tier skips with
  the reason, except under CI (``CI`` set), where it fails: CI must run the end-to-end tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


# The order in which make test's two xdist workers get the modules (--dist loadscope
# --no-loadscope-reorder hands them out in collection order, each to a worker with at most two
# tests left): the two longest first, one on each worker, then the next longest to whichever is
# free, so the two finish together. Worker time per module in a run of the suite at 0349634
# (pytest --durations=0): e2e 641 s, test_refresh 485, test_evaluate 315, test_ingest 275,
# test_images 185, test_knn 174, test_fusion 115, test_neighbours_refresh 105; the rest 50 in all.
# In collection order, test_refresh came last of the long ones and ran alone for its last
# 250 s. (test_refresh has 20 minutes beside the e2e run's training: see its timeout.)
LONGEST_FIRST = (
    "tests/e2e/test_hm_pipeline.py",
    "tests/spark/test_refresh.py",
    "tests/spark/test_evaluate.py",
    "tests/spark/test_ingest.py",
    "tests/spark/test_images.py",
    "tests/spark/test_knn.py",
    "tests/spark/test_fusion.py",
    "tests/spark/test_neighbours_refresh.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the modules of :data:`LONGEST_FIRST` first, in that order; the rest keep theirs."""
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


# Spark settings for the tests' small inputs (the test session's and the killed refresh
# driver's). UI off. Delta rebuilds a table's snapshot with 50 tasks by default: for the tests'
# small tables that is most of a commit's time (a tiny ingest 48 s -> 21 s). On a few hundred
# rows, compiling each new plan (whole-stage code generation) and re-planning it between stages
# (adaptive execution) cost more than running it (test_evaluation_lists_... alone 152-164 s ->
# 120 s), and Delta's per-file column statistics only serve to skip files of large tables
# (test_rerun_leaves_the_same_tables alone 123 s -> 107 s). The results are the same.
TEST_SPARK_CONF = {
    "spark.ui.enabled": "false",
    "spark.databricks.delta.snapshotPartitions": "2",
    "spark.sql.codegen.wholeStage": "false",
    "spark.sql.adaptive.enabled": "false",
    "spark.databricks.delta.stats.collect": "false",
}


def spark_conf_override(extra: dict[str, str] | None = None) -> str:
    """The ``spark.conf=...`` override (``--set``) of :data:`TEST_SPARK_CONF` plus ``extra``."""
    settings = {**TEST_SPARK_CONF, **(extra or {})}
    return "spark.conf={" + ", ".join(f"{k}: '{v}'" for k, v in settings.items()) + "}"


@pytest.fixture(scope="session")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("warehouse")


@pytest.fixture(scope="session")
def spark(warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """``local[2]``, 2 shuffle partitions, UI off, Delta on, warehouse under a tmp dir."""
    from filelock import FileLock

    from recsys.config import load_config
    from recsys.session import build_spark

    cfg = load_config(
        "local",
        [
            "spark.master=local[2]",
            "spark.shuffle_partitions=2",
            "spark.driver_memory=3g",
            f"spark.warehouse_dir={warehouse}",
            spark_conf_override(),
        ],
    )
    # the basetemp's parent is shared by all xdist workers of this run
    with FileLock(str(tmp_path_factory.getbasetemp().parent / "spark-start.lock")):
        session = build_spark(cfg)
    yield session
    session.stop()


def runtime_settings(session: object) -> dict[str, str]:
    """The session's runtime configuration (``spark.conf.getAll``)."""
    return dict(session.conf.getAll)  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _spark_settings_restored(request: pytest.FixtureRequest) -> Iterator[None]:
    """Give the shared session its settings back after every test that uses it."""
    if "spark" not in request.fixturenames:
        yield
        return
    session = request.getfixturevalue("spark")
    before = runtime_settings(session)
    yield
    after = runtime_settings(session)
    for key in after.keys() - before.keys():
        session.conf.unset(key)  # type: ignore[attr-defined]
    for key, value in before.items():
        if after.get(key) != value:
            session.conf.set(key, value)  # type: ignore[attr-defined]


def cache_is_empty(session: object) -> bool:
    """True when the session's cache (``DataFrame.persist``) holds nothing."""
    return bool(session._jsparkSession.sharedState().cacheManager().isEmpty())  # type: ignore[attr-defined]


def test_overrides(warehouse: Path, database: str, *overrides: str) -> list[str]:
    """The ``--set`` values of :func:`test_config`: its warehouse, its database, test sizes."""
    return [
        "spark.master=local[2]",
        "spark.shuffle_partitions=2",
        f"spark.warehouse_dir={warehouse}",
        f"data.database={database}",
        "knn.recall_sample=100",
        *overrides,
    ]


def test_config(warehouse: Path, database: str, *overrides: str) -> object:
    """A config for the test session: its warehouse, its own database, test-size settings."""
    from recsys.config import load_config

    return load_config("local", test_overrides(warehouse, database, *overrides))


test_config.__test__ = False  # type: ignore[attr-defined]
test_overrides.__test__ = False  # type: ignore[attr-defined]


def write_table(spark: object, database: str, spec: object, df: object) -> None:
    """``df``'s columns into the table ``spec`` (a :class:`recsys.tables.TableSpec`), replacing it;
    the table's other columns are null."""
    from pyspark.sql import functions as F

    from recsys import tables

    for f in spec.schema.fields:  # type: ignore[attr-defined]
        if f.name not in df.columns:  # type: ignore[attr-defined]
            df = df.withColumn(f.name, F.lit(None).cast(f.dataType))  # type: ignore[attr-defined]
    tables.replace(spark, database, spec, df, "true")  # type: ignore[arg-type]


def hm_data() -> Path:
    """The H&M folder under ../shared/data; skip with the reason when it is absent, but fail
    under CI (``CI`` set), where a skipped end-to-end tier would pass unseen."""
    path = SHARED_DATA / "hm"
    if not (path / "articles.csv").is_file():
        reason = f"H&M data not found at {path} (set RECSYS_SHARED_DATA or put ../shared/data beside the repo)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and the end-to-end tier cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    return path
