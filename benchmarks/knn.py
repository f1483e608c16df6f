"""KNN backends side by side: recall@K against exact, wall time, memory and shuffle bytes.

Runs ``recsys.knn.top_k`` with each backend on the same vectors in one Spark session and prints
one table per dataset:

* ``exact``: all pairs, a grid of (query block, data block) cells scored as dense products (the reference);
* ``lsh``: the library's LSH, candidates from buckets re-scored exactly (``--lsh KEY=VALUE,...``
  gives one row per set of ``LSHParams``; default ``LSHParams()``);
* ``mllib``: Spark MLlib's ``BucketedRandomProjectionLSH`` (``--mllib-bucket-length`` and
  ``--mllib-tables`` lists: one row per combination; ``recsys.knn.mllib``).

Datasets:

* ``hm``: the text embeddings of the 99,830 H&M articles (384-d all-MiniLM-L6-v2), from a parquet
  folder of ``(article_id, vector)`` (``--hm-vectors``) or from a pipeline warehouse
  (``--warehouse DIR``: ``DIR/recsys.db/item_embeddings``, modality ``text``, newest model_id).
  recall@K compares every article's list with the full exact result (without a finished exact
  run: 2,000 sampled queries, as below). ``--hm-limit N`` keeps the first N article_ids.
* ``synthetic``: ``--n`` vectors of ``benchmarks/synthetic.py`` (384-d, Zipf-sized clusters, the
  largest near a quarter of the items, 5 % near-duplicates). The full exact run is not done
  (time "n/a"); recall@K is measured on 2,000 sampled queries (``recall_at_k``).

Goals: on ``hm``, lsh recall@10 >= 0.95 in <= 1/4 of exact's time and >= 10x faster than mllib at
equal or better recall; on ``synthetic`` (1,000,000 vectors), lsh recall@10 >= 0.90 in under 30
minutes, with mllib failing or more than 10x slower. The last lines say which goals were met.

Measurement: each backend's result is written to parquet under the scratch folder and counted
back, so the time covers the whole computation (validation, indexing, candidates, merge, write).
Each backend runs in its own Spark job group in a worker thread and is cancelled when it passes
its time limit (``--limit-seconds``; by default none for exact and lsh, and for mllib 10x the
first lsh configuration's time on the same dataset, at least 300 s). Shuffle bytes are the sum of
``shuffleReadBytes`` and ``shuffleWriteBytes`` of the stages that ran during the backend (the
Spark UI's REST API). Peak memory is the largest resident set of this process tree (driver JVM and
Python workers) while the backend ran, next to the same sum when it started: the JVM does not
return heap it has grown, so a backend that runs after a hungrier one reports at least that one's
high-water mark (``mem at start`` shows how much was already held). Cached data is cleared between
backends, and the Python workers are started before the first backend.

    .venv/bin/python -m benchmarks.knn [--dataset hm|synthetic|all] [--backends exact,lsh,mllib]
        [--n 1000000] [--k 10] [--lsh hash=srp,bands=8 ...]
        [--mllib-bucket-length 1.0,2.0] [--mllib-tables 3,5] [--limit-seconds S]
        [--hm-vectors DIR | --warehouse DIR] [--hm-limit N] [--driver-memory 12g] [--scratch DIR]
        [--keep-scratch] [--set key=value]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pyspark import InheritableThread
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from benchmarks.common import PeakMemory, resident_bytes
from benchmarks.synthetic import synthetic_vectors

BACKENDS = ("exact", "lsh", "mllib")  # run in this order: mllib's default limit needs lsh's time
HM_VECTORS = Path("/work/knnbench/hm_text.parquet")
MIN_MLLIB_LIMIT = 300.0
NO_LSH_MLLIB_LIMIT = 3600.0  # mllib's limit when no lsh time is known
CANCEL_GRACE = 300.0  # seconds to wait for a cancelled backend's thread to return


@dataclass
class Row:
    """One line of the table: a backend with one set of parameters on one dataset."""

    backend: str
    params: str
    seconds: float | None = None
    stopped_after: float | None = None  # the backend passed its limit and was cancelled
    error: str | None = None
    skipped: str | None = None
    start_gib: float | None = None
    peak_gib: float | None = None
    shuffle_read: int | None = None
    shuffle_write: int | None = None
    recall: float | None = None
    queries: int | None = None
    result: DataFrame | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.seconds is not None and self.result is not None


# ---------------------------------------------------------------- Spark UI: stage metrics


class StageMetrics:
    """Shuffle bytes of the stages that ran between two points, from the Spark UI's REST API
    (``<uiWebUrl>/api/v1/applications/<appId>/stages``); ``None`` everywhere when the UI is off."""

    def __init__(self, spark: SparkSession) -> None:
        sc = spark.sparkContext
        self.url = f"{sc.uiWebUrl}/api/v1/applications/{sc.applicationId}/stages" if sc.uiWebUrl else None

    def stages(self) -> list[dict[str, Any]] | None:
        if self.url is None:
            return None
        try:
            with urllib.request.urlopen(self.url, timeout=60) as response:
                stages: list[dict[str, Any]] = json.load(response)
                return stages
        except OSError:
            return None

    def max_stage_id(self) -> int:
        stages = self.stages() or []
        return max((s["stageId"] for s in stages), default=-1)

    def shuffle_bytes(self, after: int) -> tuple[int | None, int | None]:
        """``(read, write)`` bytes of the stages with id > ``after``, once none of them is still
        active (the UI's listener lags the jobs by a moment)."""
        for _ in range(40):
            stages = self.stages()
            if stages is None:
                return None, None
            ran = [s for s in stages if s["stageId"] > after]
            if not any(s.get("status") in ("ACTIVE", "PENDING") for s in ran):
                break
            time.sleep(0.5)
        return (
            sum(int(s.get("shuffleReadBytes", 0)) for s in ran),
            sum(int(s.get("shuffleWriteBytes", 0)) for s in ran),
        )


# ---------------------------------------------------------------- running one backend


def run_limited(
    spark: SparkSession, group: str, work: Callable[[], DataFrame], limit: float | None
) -> tuple[DataFrame | None, float, bool, BaseException | None]:
    """Run ``work`` in a worker thread under Spark job group ``group``; cancel the group when
    ``limit`` seconds pass.

    Returns:
        ``(value, seconds, stopped, error)``: ``stopped`` is True when the limit cut it off.
    """
    sc = spark.sparkContext
    box: dict[str, Any] = {}

    def target() -> None:
        sc.setJobGroup(group, f"benchmarks.knn {group}", interruptOnCancel=True)
        try:
            box["value"] = work()
        except BaseException as err:  # reported in the table
            box["error"] = err

    thread = InheritableThread(target=target, daemon=True)
    started = time.perf_counter()
    thread.start()
    thread.join(limit)
    seconds = time.perf_counter() - started
    if not thread.is_alive():
        return box.get("value"), seconds, False, box.get("error")
    deadline = time.perf_counter() + CANCEL_GRACE
    while thread.is_alive() and time.perf_counter() < deadline:
        cancel_group(spark, group)
        thread.join(5)
    if thread.is_alive():
        print(f"  warning: {group} still running {CANCEL_GRACE:.0f} s after its cancellation", flush=True)
    return None, seconds, True, None


def cancel_group(spark: SparkSession, group: str) -> None:
    """Cancel the group's running jobs and (Spark >= 4.0) those it starts later."""
    sc = spark.sparkContext
    try:
        sc._jsc.sc().cancelJobGroupAndFutureJobs(group, "benchmark time limit")
    except Exception:  # older Spark: running jobs only (called again until the thread ends)
        sc.cancelJobGroup(group)


def resident_gib() -> float:
    """Resident memory of this process and its children (as :class:`PeakMemory` sums it), GiB."""
    return resident_bytes() / 2**30


def materialise(df: DataFrame, path: Path) -> DataFrame:
    """Write ``df`` to parquet at ``path``, count it back, and return the written data."""
    df.write.mode("overwrite").parquet(str(path))
    written = df.sparkSession.read.parquet(str(path))
    written.count()
    return written


def run_backend(
    spark: SparkSession,
    row: Row,
    compute: Callable[[], DataFrame],
    path: Path,
    limit: float | None,
    metrics: StageMetrics,
) -> Row:
    """Time ``compute`` (a ``top_k`` call) plus the write of its result; fill ``row``."""
    limit_text = f"limit {limit:,.0f} s" if limit else "no limit"
    print(f"  {row.backend} {row.params}: running ({limit_text})", flush=True)
    before = metrics.max_stage_id()
    group = f"knn-{path.name}"
    row.start_gib = resident_gib()
    with PeakMemory() as memory:
        result, seconds, stopped, error = run_limited(spark, group, lambda: materialise(compute(), path), limit)
    row.peak_gib = memory.peak_gib
    row.shuffle_read, row.shuffle_write = metrics.shuffle_bytes(before)
    if stopped:
        row.stopped_after = seconds
    elif error is not None:
        row.error = f"{type(error).__name__}: {error}".splitlines()[0]
    else:
        row.seconds, row.result = seconds, result
    spark.catalog.clearCache()
    print(f"  {row.backend} {row.params}: {time_text(row)}", flush=True)
    return row


# ---------------------------------------------------------------- recall


def recall_against(exact: DataFrame, result: DataFrame, k: int) -> dict[str, float]:
    """recall@k of ``result`` against the full ``exact`` result, computed in Spark.

    For each article of ``exact``, a neighbour of ``result`` (rank <= k) is a hit when its score
    reaches the exact k-th score minus 1e-6 (so ties with the k-th neighbour count, as in
    ``recsys.knn.recall_at_k``); recall = hits / (number of exact neighbours), averaged over
    the articles.

    Args:
        exact, result: ``top_k`` outputs (``article_id, rank, neighbour_id, score, ...``).

    Returns:
        ``{"recall": r, "queries": number of articles}``.
    """
    truth = (
        exact.where(F.col("rank") <= k)
        .groupBy("article_id")
        .agg(F.min("score").alias("kth"), F.count(F.lit(1)).alias("possible"))
    )
    hits = (
        result.where(F.col("rank") <= k)
        .join(truth, "article_id")
        .where(F.col("score") >= F.col("kth") - 1e-6)
        .groupBy("article_id")
        .agg(F.count(F.lit(1)).alias("hits"))
    )
    per_article = truth.join(hits, "article_id", "left").select(
        (F.least(F.coalesce("hits", F.lit(0)), F.col("possible")) / F.col("possible")).alias("recall")
    )
    row = per_article.agg(F.avg("recall").alias("recall"), F.count(F.lit(1)).alias("queries")).first()
    if row is None or row["queries"] == 0:
        return {"recall": float("nan"), "queries": 0.0}
    return {"recall": float(row["recall"]), "queries": float(row["queries"])}


# ---------------------------------------------------------------- datasets


def load_hm(spark: SparkSession, args: argparse.Namespace) -> tuple[DataFrame | None, str]:
    """The H&M text vectors ``(article_id, vector)`` and where they came from, or ``None`` and
    the reason they are missing."""
    parquet = Path(args.hm_vectors) if args.hm_vectors else None
    if parquet is None and args.warehouse is None and HM_VECTORS.exists():
        parquet = HM_VECTORS
    if parquet is not None:
        if not parquet.exists():
            return None, f"skipped: --hm-vectors {parquet} does not exist"
        vectors = spark.read.parquet(str(parquet)).select("article_id", "vector")
        source = f"parquet {parquet}"
    elif args.warehouse is not None:
        table = Path(args.warehouse) / "recsys.db" / "item_embeddings"
        if not (table / "_delta_log").is_dir():
            return None, f"skipped: no Delta table at {table}"
        text = spark.read.format("delta").load(str(table)).where(F.col("modality") == "text")
        newest = (
            text.groupBy("model_id")
            .agg(F.max("_metadata.file_modification_time").alias("written"))
            .orderBy(F.desc("written"), F.desc("model_id"))
            .first()
        )
        if newest is None:
            return None, f"skipped: {table} holds no text embeddings"
        vectors = text.where(F.col("model_id") == newest["model_id"]).select("article_id", "vector")
        source = f"Delta {table}, model_id {newest['model_id']}"
    else:
        return None, f"skipped: no H&M vectors ({HM_VECTORS} does not exist; give --hm-vectors or --warehouse)"
    if args.hm_limit:
        vectors = vectors.orderBy("article_id").limit(args.hm_limit)
        source += f", first {args.hm_limit:,} article_ids"
    return vectors, source


# ---------------------------------------------------------------- parameters


def parse_params(text: str) -> dict[str, Any]:
    """``"bands=24,bits_per_band=8"`` → ``{"bands": 24, "bits_per_band": 8}`` (ints, floats or strings)."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {item!r}")
        for kind in (int, float):
            try:
                out[key.strip()] = kind(value)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = value.strip()
    return out


def numbers(text: str | None, kind: type) -> list[Any]:
    return [kind(v) for v in text.split(",") if v.strip()] if text else []


def describe(params: object) -> str:
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(params).items())
    return str(params)


def lsh_description(params: object, n: int) -> str:
    """LSH parameters with ``bits_per_band`` resolved for ``n`` vectors when the class can."""
    resolved = getattr(params, "resolved", None)
    if callable(resolved):
        try:
            return describe(resolved(n))
        except Exception:  # the library is being rewritten: show what was given
            pass
    return describe(params)


# ---------------------------------------------------------------- the table


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def size(value: int | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def time_text(row: Row) -> str:
    if row.skipped:
        return "n/a"
    if row.stopped_after is not None:
        return f"stopped after {row.stopped_after:,.0f} s (limit)"
    if row.error:
        return "failed"
    return "n/a" if row.seconds is None else f"{row.seconds:,.1f}"


def ratio(row: Row, reference: Row | None) -> str:
    if row.seconds is None or reference is None or not reference.seconds:
        return "n/a"
    return f"{row.seconds / reference.seconds:.2f}x"


def table(rows: list[Row], k: int) -> list[str]:
    exact = next((r for r in rows if r.backend == "exact" and r.finished), None)
    lsh = next((r for r in rows if r.backend == "lsh" and r.finished), None)
    header = ["backend", f"recall@{k}", "queries", "seconds", "vs exact", "vs lsh", "mem at start", "peak mem",
              "shuffle read", "shuffle write", "parameters"]
    cells = [
        [
            r.backend,
            "n/a" if r.recall is None or math.isnan(r.recall) else f"{r.recall:.4f}",
            "n/a" if r.queries is None else f"{r.queries:,}",
            time_text(r),
            ratio(r, exact),
            ratio(r, lsh),
            gib(r.start_gib),
            gib(r.peak_gib),
            size(r.shuffle_read),
            size(r.shuffle_write),
            r.params,
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    align = ["<", ">", ">", ">", ">", ">", ">", ">", ">", ">", "<"]

    def line(values: list[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, align, widths)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    out += [f"  {r.backend} {r.params}: {r.error or r.skipped}" for r in rows if r.error or r.skipped]
    return out


def goals(dataset: str, rows: list[Row], k: int) -> list[str]:
    """One line per goal of the module docstring: met, not met, or not measured."""
    lsh = next((r for r in rows if r.backend == "lsh"), None)
    exact = next((r for r in rows if r.backend == "exact"), None)
    mllib = [r for r in rows if r.backend == "mllib" and not r.skipped]
    out = []
    if lsh is None or not lsh.finished or lsh.recall is None or lsh.seconds is None:
        return [f"goals ({dataset}): not measured (no finished lsh run with recall)"]
    verdict = "met" if lsh.recall >= (0.95 if dataset == "hm" else 0.90) else "NOT met"
    if dataset == "hm":
        out.append(f"goal hm: lsh recall@{k} >= 0.95: {lsh.recall:.4f}, {verdict}")
        if exact is not None and exact.finished and exact.seconds:
            share = lsh.seconds / exact.seconds
            out.append(f"goal hm: lsh time <= 1/4 of exact's: {share:.3f}, {'met' if share <= 0.25 else 'NOT met'}")
        else:
            out.append("goal hm: lsh time <= 1/4 of exact's: not measured (no finished exact run)")
    else:
        out.append(f"goal synthetic: lsh recall@{k} >= 0.90: {lsh.recall:.4f}, {verdict}")
        fast = "met" if lsh.seconds < 1800 else "NOT met"
        out.append(f"goal synthetic: lsh under 30 min: {lsh.seconds:,.0f} s, {fast}")
    if not mllib:
        out.append(f"goal {dataset}: lsh >= 10x faster than mllib: not measured (no mllib run)")
    for r in mllib:
        if r.stopped_after is not None or r.error:
            cut = "stopped" if r.stopped_after is not None else "failed"
            ok = "met" if r.error or (r.stopped_after or 0) >= 10 * lsh.seconds else "not measured (limit < 10x lsh)"
            out.append(f"goal {dataset}: mllib {r.params}: {cut}, {ok}")
        elif r.seconds is not None and r.recall is not None:
            times = r.seconds / lsh.seconds
            if dataset == "hm" and r.recall < lsh.recall:
                out.append(f"goal hm: mllib {r.params}: recall {r.recall:.4f} < lsh's: not comparable "
                           f"({times:.1f}x lsh's time)")
            else:
                out.append(f"goal {dataset}: mllib {r.params}: {times:.1f}x lsh's time, "
                           f"{'met' if times >= 10 else 'NOT met'}")
    return out


# ---------------------------------------------------------------- main




def warm_python_workers(spark: SparkSession) -> None:
    """Start the Python workers once, so the first backend does not pay their start-up."""
    parts = spark.sparkContext.defaultParallelism
    spark.range(parts, numPartitions=parts).mapInPandas(lambda batches: batches, "id long").count()


def benchmark(
    spark: SparkSession, dataset: str, vectors: DataFrame, dim: int, args: argparse.Namespace, folder: Path
) -> list[Row]:
    """Run the requested backends on ``vectors`` and measure their recall; the table's rows."""
    from recsys import knn

    n = vectors.count()
    metrics = StageMetrics(spark)
    warm_python_workers(spark)
    lsh_params = [knn.LSHParams(**parse_params(p)) for p in args.lsh] or [knn.LSHParams()]
    rows: list[Row] = []
    lsh_seconds: float | None = None
    for backend in (b for b in BACKENDS if b in args.backends):
        if backend == "exact":
            row = Row("exact", "library defaults")
            if dataset == "synthetic":
                row.skipped = f"not run in full (recall uses exact KNN of {args.sample:,} sampled queries)"
                rows.append(row)
                continue
            rows.append(run_backend(spark, row, partial(knn.top_k, vectors, args.k, backend="exact"),
                                    folder / f"{len(rows):02d}-exact", args.limit_seconds, metrics))
        elif backend == "lsh":
            for p in lsh_params:
                row = Row("lsh", lsh_description(p, n))
                rows.append(run_backend(spark, row, partial(knn.top_k, vectors, args.k, backend="lsh", params=p),
                                        folder / f"{len(rows):02d}-lsh", args.limit_seconds, metrics))
                if lsh_seconds is None and row.seconds is not None:
                    lsh_seconds = row.seconds
        else:
            limit = args.limit_seconds
            if limit is None:
                limit = max(MIN_MLLIB_LIMIT, 10 * lsh_seconds) if lsh_seconds else NO_LSH_MLLIB_LIMIT
            combos = list(itertools.product(args.mllib_bucket_length or [None], args.mllib_tables or [None]))
            for bucket_length, tables in combos:
                kwargs = {"bucket_length": bucket_length, "num_hash_tables": tables}
                m = knn.MLlibParams(**{key: v for key, v in kwargs.items() if v is not None})
                row = Row("mllib", describe(m))
                length = getattr(m, "length", None)
                if callable(length):
                    row.params += f" (bucket length used {length(n, dim):.4g})"
                rows.append(run_backend(spark, row, partial(knn.top_k, vectors, args.k, backend="mllib", mllib=m),
                                        folder / f"{len(rows):02d}-mllib", limit, metrics))
    exact = next((r for r in rows if r.backend == "exact" and r.finished), None)
    for row in rows:
        if not row.finished:
            continue
        assert row.result is not None
        print(f"  recall of {row.backend} {row.params}", flush=True)
        if dataset == "hm" and exact is not None:
            assert exact.result is not None
            recall = recall_against(exact.result, row.result, args.k)
        else:
            recall = knn.recall_at_k(vectors, row.result, args.k, sample=args.sample, seed=7)
        row.recall, row.queries = recall["recall"], int(recall["queries"])
        spark.catalog.clearCache()
    return rows


def build_session(args: argparse.Namespace, warehouse: Path) -> SparkSession:
    from recsys.config import load_config
    from recsys.session import build_spark

    ui = ("spark.conf={spark.ui.enabled: 'true', spark.ui.retainedStages: '100000', "
          "spark.ui.retainedJobs: '100000', spark.sql.ui.retainedExecutions: '10000'}")
    overrides = [f"spark.warehouse_dir={warehouse}", f"spark.driver_memory={args.driver_memory}", ui, *args.set]
    return build_spark(load_config("local", overrides))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["hm", "synthetic", "all"], default="all")
    parser.add_argument("--backends", default="exact,lsh,mllib", help="comma-separated: exact, lsh, mllib")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--sample", type=int, default=2000, help="sampled queries for recall when exact is not run in full")
    parser.add_argument("--lsh", action="append", default=[], metavar="KEY=VALUE,...",
                        help="LSHParams of one lsh row, e.g. hash=srp,bands=8 (repeat for more rows; "
                             "default: LSHParams())")
    parser.add_argument("--mllib-bucket-length", default=None, help="comma-separated bucket lengths")
    parser.add_argument("--mllib-tables", default=None, help="comma-separated numbers of hash tables")
    parser.add_argument("--limit-seconds", type=float, default=None,
                        help="per-backend limit (default: none for exact and lsh; mllib: 10x lsh, at least 300 s)")
    parser.add_argument("--hm-vectors", default=None, help=f"parquet of (article_id, vector); default {HM_VECTORS}")
    parser.add_argument("--warehouse", default=None, help="pipeline warehouse holding recsys.db/item_embeddings")
    parser.add_argument("--hm-limit", type=int, default=0, help="first N H&M article_ids only (smoke tests)")
    parser.add_argument("--driver-memory", default="12g")
    parser.add_argument("--scratch", default=str(Path(tempfile.gettempdir()) / "recsys-knn-bench"))
    parser.add_argument("--keep-scratch", action="store_true", help="keep the results written under --scratch")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. spark.shuffle_partitions=16")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown:
        parser.error(f"--backends: unknown {', '.join(unknown)} (choose from {', '.join(BACKENDS)})")
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    try:
        args.mllib_bucket_length = numbers(args.mllib_bucket_length, float)
        args.mllib_tables = numbers(args.mllib_tables, int)
        for p in args.lsh:
            parse_params(p)
    except ValueError as err:
        parser.error(str(err))

    from recsys.cli import configure_logging

    configure_logging()
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.scratch))
    spark = build_session(args, run_dir / "warehouse")
    reports: list[tuple[str, str, list[Row]]] = []
    try:
        datasets = ["hm", "synthetic"] if args.dataset == "all" else [args.dataset]
        for dataset in datasets:
            print(f"[{dataset}]", flush=True)
            if dataset == "hm":
                vectors, source = load_hm(spark, args)
                if vectors is None:
                    print(f"  {source}", flush=True)
                    reports.append((dataset, source, []))
                    continue
            else:
                vectors = synthetic_vectors(spark, n=args.n, seed=args.seed)
                source = f"benchmarks/synthetic.py, seed {args.seed}"
            started = time.perf_counter()
            vectors = materialise(vectors, run_dir / dataset / "vectors")
            first = vectors.select(F.size("vector").alias("dim")).first()
            dim = int(first["dim"]) if first else 0
            n = vectors.count()
            source = f"{n:,} vectors, dim {dim}, {source} (prepared in {time.perf_counter() - started:.1f} s)"
            print(f"  {source}", flush=True)
            rows = benchmark(spark, dataset, vectors, dim, args, run_dir / dataset)
            reports.append((dataset, source, rows))
    finally:
        cores = spark.sparkContext.defaultParallelism
        spark.stop()
        if not args.keep_scratch:
            shutil.rmtree(run_dir, ignore_errors=True)

    print(f"\nKNN backends, k={args.k}, Spark local, {cores} cores, driver memory {args.driver_memory}")
    for dataset, source, rows in reports:
        print(f"\n{dataset}: {source}")
        if not rows:
            continue
        for text in table(rows, args.k):
            print(text)
        for text in goals(dataset, rows, args.k):
            print(text)
    if args.keep_scratch:
        print(f"\nresults kept under {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
