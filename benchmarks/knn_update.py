"""A day's incremental top-K (:func:`recsys.knn.update_top_k`) on the driver against the
distributed update, side by side in one Spark session, on the same synthetic day.

Day N is ``--n`` synthetic vectors (:mod:`benchmarks.synthetic`); the index is fitted on it and
its top-K computed with the full search. Day N+1 adds 1% new vectors, changes 0.5% and removes
0.2% (the shares of ``benchmarks.refresh``'s day). Each way then updates day N's lists to day
N+1, ``--repeat`` times in turn; both read the same Parquet files. Prints the best wall time
of each, the ratio driver / distributed, and whether both gave the same lists (same neighbours
in the same order, largest score difference). Exits 1 when they differ.

    .venv/bin/python -m benchmarks.knn_update [--n 100000] [--dim 384] [--segments 0] [--k 12] \\
        [--repeat 2] [--scratch DIR] [--set key=value ...]

``--segments S`` cuts the vectors into S equal slices reported per pair (``segment_scores``),
as the fused vectors' modalities are.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from benchmarks.synthetic import ID_WIDTH, synthetic_vectors
from recsys.knn import LSHParams, fit_index, top_k, update_top_k
from recsys.knn.update import ListUpdate

CHANGED_EVERY, REMOVED_EVERY, NEW_SHARE = 200, 500, 0.01  # 0.5% changed, 0.2% removed, 1% new


def build_session(warehouse: Path, overrides: list[str]) -> SparkSession:
    from recsys.config import load_config
    from recsys.session import build_spark

    return build_spark(load_config("local", [f"spark.warehouse_dir={warehouse}", "spark.driver_memory=8g",
                                             *overrides]))


def days(spark: SparkSession, n: int, dim: int, folder: Path) -> tuple[DataFrame, DataFrame, DataFrame]:
    """Day N's and day N+1's vectors (written to ``folder`` as Parquet, read back) and the
    ``article_id`` of day N+1's new and changed vectors."""
    new = max(1, round(n * NEW_SHARE))
    changed = len(range(0, n, CHANGED_EVERY))
    raw = synthetic_vectors(spark, n + new + changed, dim, seed=0)
    i = F.col("article_id").cast("long")
    day_n = raw.where(i < n)
    # a changed article takes the vector of one of the items past the new ones
    moved = raw.where(i >= n + new).select(
        F.lpad(((i - n - new) * CHANGED_EVERY).cast("string"), ID_WIDTH, "0").alias("article_id"), "vector")
    kept = day_n.where((i % CHANGED_EVERY != 0) & (i % REMOVED_EVERY != 7))
    day_n1 = kept.unionByName(raw.where((i >= n) & (i < n + new))).unionByName(moved)
    day_n.write.mode("overwrite").parquet(str(folder / "day_n"))
    day_n1.write.mode("overwrite").parquet(str(folder / "day_n1"))
    ids = raw.where((i >= n) & (i < n + new)).select("article_id").unionByName(moved.select("article_id"))
    return (spark.read.parquet(str(folder / "day_n")), spark.read.parquet(str(folder / "day_n1")),
            spark.createDataFrame(ids.toArrow()))


def timed(way: str, run: object) -> tuple[float, ListUpdate]:
    started = time.perf_counter()
    update = run()  # type: ignore[operator]
    update.lists.count()
    update.replaced.count()
    seconds = time.perf_counter() - started
    print(f"  {way:<12} {seconds:8.1f} s  ({update.affected:,} lists searched again, {update.touched:,} entered "
          f"by a changed vector, {update.removed:,} removed{', full search' if update.full else ''})", flush=True)
    return seconds, update


def ordered(update: ListUpdate) -> pa.Table:
    return update.lists.select("article_id", "rank", "neighbour_id", "score").toArrow().sort_by(
        [("article_id", "ascending"), ("rank", "ascending")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="day N's vectors")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--segments", type=int, default=0, help="equal slices reported per pair (0: none)")
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--scratch", default=str(Path(tempfile.gettempdir()) / "recsys-knn-update-bench"))
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. spark.shuffle_partitions=16")
    args = parser.parse_args(argv)
    if args.n < 1000 or not 0 <= args.segments <= args.dim:
        parser.error("--n must be >= 1000 and --segments between 0 and --dim")
    folder = Path(args.scratch)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    spark = build_session(folder / "warehouse", args.set)
    try:
        edges = np.linspace(0, args.dim, args.segments + 1).astype(int)
        segments = tuple((f"s{j}", int(edges[j]), int(edges[j + 1])) for j in range(args.segments))
        day_n, day_n1, changed = days(spark, args.n, args.dim, folder)
        index = fit_index(day_n, LSHParams())
        top_k(day_n, args.k, index=index, segments=segments).write.parquet(str(folder / "previous"))
        previous = spark.read.parquet(str(folder / "previous"))
        print(f"{args.n:,} vectors of {args.dim} floats ({args.segments} segments), k={args.k}; day N+1: "
              f"{changed.count():,} new or changed, removed every {REMOVED_EVERY}th", flush=True)
        best: dict[str, float] = {}
        results: dict[str, ListUpdate] = {}
        for _ in range(args.repeat):
            for way, on_driver in (("distributed", False), ("driver", True)):
                seconds, results[way] = timed(way, lambda d=on_driver: update_top_k(
                    day_n1, previous, changed, args.k, index, segments, on_driver=d))
                best[way] = min(best.get(way, float("inf")), seconds)
        a, b = ordered(results["distributed"]), ordered(results["driver"])
        same = all(a.column(c).equals(b.column(c)) for c in ("article_id", "rank", "neighbour_id"))
        diff = float(np.abs(a.column("score").to_numpy() - b.column("score").to_numpy()).max()) if same and len(a) else 0.0
        print(f"best of {args.repeat}: distributed {best['distributed']:.1f} s, driver {best['driver']:.1f} s, "
              f"ratio {best['driver'] / best['distributed']:.2f}")
        print(f"same lists: {same} ({a.num_rows:,} rows against {b.num_rows:,}); largest score difference {diff:.1e}")
        return 0 if same and diff <= 1e-5 else 1
    finally:
        spark.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
