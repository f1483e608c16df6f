"""Run bookkeeping without Spark: how a stage report becomes ``metrics`` rows."""

from __future__ import annotations

import subprocess
import sys

from recsys.runlog import flatten_report


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
