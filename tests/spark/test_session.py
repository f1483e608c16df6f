"""A job started inside a running session uses it as it is; stage settings are scoped."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.config import load_config
from recsys.session import build_spark, sql_conf

pytestmark = pytest.mark.spark


def test_a_job_inside_a_running_session_does_not_retune_it(spark, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    partitions = spark.conf.get("spark.sql.shuffle.partitions")
    ansi = spark.conf.get("spark.sql.ansi.enabled")
    flipped = "false" if ansi == "true" else "true"
    cfg = load_config("hm", ["spark.shuffle_partitions=16", f"spark.conf={{spark.sql.ansi.enabled: '{flipped}'}}"])
    assert build_spark(cfg) is spark
    assert spark.conf.get("spark.sql.shuffle.partitions") == partitions != "16"
    assert spark.conf.get("spark.sql.ansi.enabled") == ansi
    assert not (tmp_path / "spark-warehouse-hm").exists()  # nothing created for a session that exists


def test_sql_conf_restores_set_and_unset_keys(spark) -> None:  # type: ignore[no-untyped-def]
    batch = "spark.sql.execution.arrow.maxRecordsPerBatch"
    before = spark.conf.get(batch)
    with sql_conf(spark, {batch: "17", "spark.recsys.test.unset": "x"}):
        assert spark.conf.get(batch) == "17" and spark.conf.get("spark.recsys.test.unset") == "x"
    assert spark.conf.get(batch) == before
    assert spark.conf.get("spark.recsys.test.unset", None) is None
    with pytest.raises(RuntimeError), sql_conf(spark, {batch: "5"}):
        raise RuntimeError("a failing stage")
    assert spark.conf.get(batch) == before
