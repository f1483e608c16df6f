"""The daily refresh on a slice of the real H&M data: day N, a rerun, day N+1 (new, changed and
removed articles, new images, a new day of purchases) in a driver killed with SIGKILL mid-stage,
day N+1 run again to the end while a reader reads, and day N+1 from scratch with the same fitted
models: every output table equal.

The day files are written at test time from ../shared/data/hm (benchmarks/refresh.py's
``write_day``); nothing of the H&M data is in the repository.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from delta.tables import DeltaTable
from pyspark.sql import functions as F

from benchmarks.refresh import compare_tables, copy_fitted, plan_days, write_day
from recsys import state, tables
from recsys.config import load_config
from recsys.pipeline import RUN_STAGES, run
from recsys.runlog import default_run_id
from recsys.stages import maintain
from tests.conftest import hm_data, test_overrides

pytestmark = pytest.mark.spark

K = 5


def whole_lists(spark, db: str, spec: tables.TableSpec, key: str) -> tuple[int, bool]:  # type: ignore[no-untyped-def]
    """One read of a list table: (keys, whether every key has ranks 1..K exactly once)."""
    stats = tables.first_row(
        tables.read(spark, db, spec).groupBy(key)
        .agg(F.count(F.lit(1)).alias("n"), F.countDistinct("rank").alias("ranks"), F.max("rank").alias("top"))
        .agg(F.count(F.lit(1)).alias("keys"),
             F.sum(((F.col("n") != K) | (F.col("ranks") != K) | (F.col("top") != K)).cast("int")).alias("broken"))
    )
    return int(stats["keys"]), not stats["broken"]


def history_row(spark, db: str, spec: tables.TableSpec, version: int):  # type: ignore[no-untyped-def]
    """The Delta log's entry for one commit of a table (``DESCRIBE HISTORY``)."""
    return tables.first_row(DeltaTable.forName(spark, tables.qualified(db, spec)).history()
                            .where(F.col("version") == version))


def kill_mid_stage(spark, overrides: list[str], db: str, run_id: str, log: Path,  # type: ignore[no-untyped-def]
                   spec: tables.TableSpec, version: int) -> str:
    """Run the refresh in a driver process of its own (:mod:`tests.spark.refresh_driver`) and
    kill it, JVM and Python workers included, with SIGKILL as soon as ``spec``'s Delta log has
    commit ``version``. Returns the driver's log tail.

    Raises:
        AssertionError: the driver ended, or did not reach that commit within 10 minutes.
    """
    locations = {s.name: tables.location(spark, db, s) for s in tables.ALL_TABLES}
    commit = Path(locations[spec.name].removeprefix("file:")) / "_delta_log" / f"{version:020d}.json"
    argument = json.dumps({"overrides": overrides, "database": db, "run_id": run_id, "locations": locations})
    with log.open("wb") as out:
        driver = subprocess.Popen([sys.executable, "-m", "tests.spark.refresh_driver", argument],
                                  cwd=Path(__file__).resolve().parents[2], stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # its own process group: the JVM's too
        deadline = time.monotonic() + 600
        try:
            while not commit.exists() and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            with contextlib.suppress(ProcessLookupError):  # a driver that ended has no group left
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    tail = log.read_text(errors="replace")[-3000:]
    assert commit.exists(), f"the driver ended or stalled before {spec.name} version {version}:\n{tail}"
    return tail


# five pipeline runs (one in a driver killed mid-stage): 566 s beside the other worker on an
# AVX2-only machine, too near pytest.ini's 600 s, whose interrupt leaves this worker's Spark
# session unusable for every test after it
@pytest.mark.timeout(1200)
def test_an_incremental_day_killed_and_rerun_equals_a_full_recompute_and_readers_see_whole_lists(  # type: ignore[no-untyped-def]
        spark, warehouse: Path, tmp_path: Path) -> None:
    source = hm_data()
    days = plan_days(source, 150)
    files = tmp_path / "hm"

    def overrides(db: str, *extra: str) -> list[str]:
        # batch size 1: a text or image is embedded alone, the same bits whatever else is embedded
        return test_overrides(
            warehouse, db, "data.source=hm", f"data.path={files}", "image.weights=none", "image.height=64",
            "image.width=48", "text.batch_size=1", "image.batch_size=1", "quality.probe_max_iter=0",
            "knn.recall_sample=0", f"knn.k={K}", f"customers.k={K}", "knn.lsh.target_bucket_size=25",
            "knn.lsh.probes=4", "knn.modalities=[fused, text, image]", "behaviour.min_purchases=1",
            "behaviour.max_iter=3", "behaviour.refit_days=30", *extra)

    def config(db: str, *extra: str):  # type: ignore[no-untyped-def]
        return load_config("local", overrides(db, *extra))

    day_n, day_n1 = default_run_id(days.last_day), default_run_id(days.last_day + dt.timedelta(days=1))
    write_day(source, files, days, next_day=False)
    first = run(spark, config("refresh_a"), day_n, RUN_STAGES)
    assert first["ingest"]["articles"] == len(days.ids) - len(days.held_back)
    # the same day again: nothing to do
    again = run(spark, config("refresh_a"), day_n, RUN_STAGES)
    assert again["ingest"]["transaction_days_written"] == 0 and again["embed"]["text"]["embedded"] == 0
    assert first["embed"]["image"]["embedded"] > 0 and again["embed"]["image"]["embedded"] == 0
    assert again["behaviour"]["skipped"].startswith("fitted by run")
    assert {m: v["mode"] for m, v in again["neighbours"].items() if isinstance(v, dict)} == dict.fromkeys(
        ("fused", "text", "image"), "unchanged")
    assert tables.read(spark, "refresh_a", tables.RUNS).count() == 1  # the same run id: one row, replaced
    assert again["recommend"]["skipped"] == again["customers"]["skipped"] == f"inputs unchanged since run {day_n}"

    # day N+1 in a driver of its own, killed with SIGKILL in the middle of the embed stage: the
    # day's articles and transactions are in, its new and changed texts embedded, nothing else
    write_day(source, files, days, next_day=True)
    embeddings_before = state.table_version(spark, "refresh_a", tables.ITEM_EMBEDDINGS)
    killed_at = kill_mid_stage(spark, overrides("refresh_a"), "refresh_a", day_n1, tmp_path / "killed.log",
                               tables.ITEM_EMBEDDINGS, embeddings_before + 1)
    text_merge = history_row(spark, "refresh_a", tables.ITEM_EMBEDDINGS, embeddings_before + 1)
    assert text_merge["operation"] == "MERGE", killed_at
    assert int(text_merge["operationMetrics"]["numTargetRowsInserted"]) == len(days.held_back)
    assert int(text_merge["operationMetrics"]["numTargetRowsUpdated"]) == len(days.changed)
    # deletion vectors: the changed rows are marked deleted, the rest of their files is not copied
    assert int(text_merge["operationMetrics"]["numTargetRowsCopied"]) == 0, text_merge["operationMetrics"]
    assert int(text_merge["operationMetrics"]["numTargetDeletionVectorsAdded"]) > 0
    assert tables.read(spark, "refresh_a", tables.RUNS).where(F.col("run_id") == day_n1).count() == 0
    assert state.consumed(spark, "refresh_a", "neighbours").run_id == day_n

    # day N+1 again, to the end, with a reader reading the served lists all along
    reads: list[tuple[int, bool, int, bool]] = []
    done = threading.Event()

    def reader() -> None:
        # a read every few seconds, not back to back: each read is Spark jobs that compete with
        # the run they watch for this session's two task slots (with a 1 s pause: 65 reads in the run's 146 s)
        while not done.is_set():
            reads.append((*whole_lists(spark, "refresh_a", tables.ITEM_RECOMMENDATIONS, "article_id"),
                          *whole_lists(spark, "refresh_a", tables.CUSTOMER_RECOMMENDATIONS, "customer_id")))
            done.wait(3.0)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        incremental = run(spark, config("refresh_a"), day_n1, RUN_STAGES)
    finally:
        done.set()
        thread.join()
    # the killed driver wrote the new day and the texts: the rerun writes neither again
    assert incremental["ingest"]["transaction_days_written"] == 0
    assert incremental["embed"]["text"]["embedded"] == 0
    assert incremental["embed"]["image"]["embedded"] == len(days.held_back)  # the new articles' images
    assert incremental["behaviour"]["skipped"].startswith("fitted by run")  # ALS waits for its weekly refit
    assert incremental["neighbours"]["text"]["mode"] == incremental["neighbours"]["image"]["mode"] == "update"
    assert incremental["neighbours"]["fused"]["on_driver"] is True  # the slice's vectors fit the driver
    articles_before, articles_after = len(days.ids) - len(days.held_back), len(days.ids) - len(days.removed)
    assert len(reads) >= 3 and all(whole_items and whole_customers for _, whole_items, _, whole_customers in reads)
    assert {n for n, _, _, _ in reads} <= {articles_before, articles_after}  # one version or the other, never a mix

    # day N+1 from scratch, with the fitted LSH index and ALS factors of the incremental run
    copy_fitted(spark, "refresh_a", "refresh_b")
    full = run(spark, config("refresh_b", "knn.recompute=true"), day_n1, RUN_STAGES)
    assert full["neighbours"]["text"]["mode"] == "full" and "recompute" in full["neighbours"]["text"]["reason"]
    # equal by key: the same rows, floats within 1e-5 ("noise": a score computed in another block
    # of the search, whose layout follows the tables' files, which the killed run changed), and
    # near-equal neighbours at one rank the other way round ("ties")
    compared = compare_tables(spark, "refresh_a", "refresh_b")
    assert compared["articles"]["rows_a"] == articles_after and compared["transactions"]["rows_a"] > 0
    assert compared["customer_recommendations"]["rows_a"] > 0
    assert {name: (c["rows_a"] - c["rows_b"], c["differ"]) for name, c in compared.items()} == {
        name: (0, 0) for name in compared}, compared
    assert all(c["only_a"] == c["only_b"] == 0 for name, c in compared.items()
               if name in ("articles", "customers", "transactions", "item_embeddings")), compared

    # maintain: OPTIMIZE and VACUUM (retention 0 here) keep every table's rows and delete the
    # files no current version needs
    location = Path(tables.location(spark, "refresh_a", tables.ITEM_EMBEDDINGS).removeprefix("file:"))
    def data_files() -> int:  # not the Delta log's checkpoints
        return sum("_delta_log" not in p.parts for p in location.rglob("*.parquet"))

    files_before = data_files()
    cfg = config("refresh_a")
    rows = {s.name: tables.read(spark, "refresh_a", s).count() for s in (tables.ITEM_EMBEDDINGS, tables.ITEM_NEIGHBOURS)}
    report = maintain.run(spark, cfg.model_copy(update={"maintain": cfg.maintain.model_copy(
        update={"retention_hours": 0, "tables": ["item_embeddings", "item_neighbours"]})}), "run-m")
    assert set(report) == {"retention_hours", "item_embeddings", "item_neighbours"}
    assert {name: tables.read(spark, "refresh_a", s).count() for name, s in
            (("item_embeddings", tables.ITEM_EMBEDDINGS), ("item_neighbours", tables.ITEM_NEIGHBOURS))} == rows
    current = int(DeltaTable.forName(spark, "refresh_a.item_embeddings").detail().first()["numFiles"])
    assert report["item_embeddings"]["files_after"] == current == data_files() < files_before
    # a retention other than 0 goes into the table property Delta 4's VACUUM reads
    maintain.run(spark, cfg.model_copy(update={"maintain": cfg.maintain.model_copy(
        update={"retention_hours": 24, "tables": ["item_neighbours"], "optimize": False})}), "run-m")
    properties = DeltaTable.forName(spark, "refresh_a.item_neighbours").detail().first()["properties"]
    assert properties["delta.deletedFileRetentionDuration"] == "interval 24 hours"


def test_the_comparison_tells_float_noise_and_near_ties_from_real_differences(spark) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import write_table

    schema = "article_id string, modality string, rank int, neighbour_id string, score float"
    base = [("a", "text", 1, "b", 0.9), ("a", "text", 2, "c", 0.5), ("b", "text", 1, "a", 0.9),
            ("c", "text", 1, "a", 0.5), ("c", "text", 2, "b", 0.4)]
    other = [("a", "text", 1, "b", 0.9),  # equal
             ("a", "text", 2, "c", 0.5 + 8e-6),  # float noise
             ("b", "text", 1, "c", 0.9 + 1e-6),  # a near tie: another neighbour, the same score
             ("c", "text", 1, "a", 0.6)]  # a real difference; (c, 2) is missing: another
    for db, rows in (("compare_a", base), ("compare_b", other)):
        tables.ensure_tables(spark, db)
        write_table(spark, db, tables.ITEM_NEIGHBOURS, spark.createDataFrame(rows, schema))
    got = compare_tables(spark, "compare_a", "compare_b", specs=(tables.ITEM_NEIGHBOURS,))["item_neighbours"]
    assert got == {"rows_a": 5, "rows_b": 4, "only_a": 4, "only_b": 3, "noise": 1, "ties": 1, "differ": 2}
