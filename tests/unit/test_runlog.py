"""Run bookkeeping without Spark: how a stage report becomes ``metrics`` rows."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

from recsys.runlog import default_run_id, flatten_report, run_date


def test_run_date_is_the_date_that_ends_the_run_id_else_today() -> None:
    assert run_date(default_run_id(dt.date(2020, 9, 23))) == dt.date(2020, 9, 23)
    assert run_date("nightly-2021-02-28") == dt.date(2021, 2, 28)
    today = dt.datetime.now(dt.timezone.utc).date()
    assert run_date("e2e") == today and run_date("run-2021-02-30") == today  # no such day: today


def test_flatten_report_keys_numbers_by_path_and_files_by_name() -> None:
    out: dict[str, float] = {}
    report = {
        "files": [{"source": "s3a://bucket/hm/articles.csv", "input": 7, "quarantined": 2},
                  {"source": "/data/hm/customers.csv/", "input": 3}],
        "text": {"embedded": 4, "model_id": "BertModel@ab12", "ok": True},
        "seconds": 1.5,
        "skipped": "no transactions",
    }
    flatten_report("ingest", report, out)
    assert out == {
        "ingest.files.articles.csv.input": 7.0,
        "ingest.files.articles.csv.quarantined": 2.0,
        "ingest.files.customers.csv.input": 3.0,
        "ingest.text.embedded": 4.0,
        "ingest.text.ok": 1.0,
        "ingest.seconds": 1.5,
    }


def test_no_stage_imports_the_pipeline() -> None:
    """No import cycle: stages (evaluate flattens its report through recsys.runlog) never import
    the pipeline that runs them."""
    code = ("import sys\nfrom recsys.stages import STAGES, stage_function\n"
            "for s in STAGES: stage_function(s)\nprint('recsys.pipeline' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
