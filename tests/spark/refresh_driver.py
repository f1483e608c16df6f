"""A refresh driver in its own process, for the test that kills one with SIGKILL mid-stage.

``python -m tests.spark.refresh_driver SPEC`` where SPEC is JSON: ``overrides`` (the config's
``--set`` values), ``database``, ``run_id`` and ``locations`` (table name → Delta location). The
test's own session holds the embedded Derby metastore, which one JVM at a time can open, so this
driver keeps its catalog in memory and registers the test's tables by location: it reads and
writes the very same Delta tables, and nothing but their Delta logs coordinates the two processes.
"""

from __future__ import annotations

import json
import logging
import sys

from recsys import tables
from recsys.config import load_config
from recsys.pipeline import RUN_STAGES, run
from recsys.session import build_spark
from tests.conftest import spark_conf_override


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config("local", [
        *spec["overrides"],
        spark_conf_override({"spark.sql.catalogImplementation": "in-memory"}),
    ])
    spark = build_spark(cfg)
    database = spec["database"]
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {database}")
    for name, location in spec["locations"].items():
        spark.sql(f"CREATE TABLE {database}.{name} USING DELTA LOCATION {tables.sql_string(location)}")
    run(spark, cfg, spec["run_id"], RUN_STAGES)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
