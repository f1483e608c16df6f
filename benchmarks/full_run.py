"""The full pipeline on all of ../shared/data/hm/articles.csv: the figures for the README.

Prints wall time per stage, peak memory of the driver and its workers, rows per table,
recall@K of LSH against exact (sampled queries) and the share of top-K neighbours that share the
article's product_type_name, per modality.

    .venv/bin/python benchmarks/full_run.py [--warehouse DIR] [--set key=value ...] [--evaluate]

Text embedding is incremental: with a warehouse from an earlier run, unchanged articles are
skipped and the embed time drops accordingly (the report says how many were embedded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks.common import PeakMemory, hm_path
from recsys import tables
from recsys.cli import configure_logging
from recsys.config import load_config
from recsys.pipeline import RUN_STAGES, run
from recsys.session import build_spark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--warehouse", default="spark-warehouse-hm")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--run-id", default="bench-full")
    parser.add_argument("--evaluate", action="store_true", help="also run the evaluate stage")
    args = parser.parse_args(argv)
    configure_logging()
    cfg = load_config("hm", [f"data.path={hm_path()}", f"spark.warehouse_dir={args.warehouse}", *args.set])
    started = time.perf_counter()
    with PeakMemory() as memory:
        spark = build_spark(cfg)
        report = run(spark, cfg, args.run_id, (*RUN_STAGES, "evaluate") if args.evaluate else RUN_STAGES)
    total = time.perf_counter() - started
    db = cfg.data.database
    print(json.dumps(report, indent=1, default=str))
    print(f"\n{'stage':<12}{'seconds':>10}")
    for stage, value in report.items():
        print(f"{stage:<12}{value['seconds']:>10.1f}")
    print(f"{'total':<12}{total:>10.1f}   (incl. Spark start)")
    print(f"peak memory (driver JVM + Python workers, RSS): {memory.peak_gib:.2f} GiB")
    print("\nrows per table")
    for spec in tables.ALL_TABLES:
        print(f"  {spec.name:<26}{tables.read(spark, db, spec).count():>10,}")
    print(f"\n{'modality':<10}{'recall@k':>10}{'same product type@k':>22}")
    for modality in cfg.knn.modalities:
        entry = report["neighbours"].get(modality)
        if entry:
            print(f"{modality:<10}{entry.get('recall_at_k', float('nan')):>10.4f}{entry['category_precision_at_k']:>22.4f}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
