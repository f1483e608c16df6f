"""The ``recsys`` command: one subcommand per stage, ``run`` for all, and lookups.

    recsys run [--conf local] [--set knn.k=20] [--run-date 2026-11-21] [--evaluate]
    recsys ingest | train | behaviour | embed | neighbours | recommend | customers | evaluate | maintain   (one stage)
    recsys export-submission submission.csv           (customer_recommendations as customer_id,prediction)
    recsys similar 0108775015                        (an article and its top-K)
    recsys sql "SELECT * FROM recsys.item_recommendations WHERE article_id = '0108775015' ORDER BY rank"
    recsys metrics [--run-id ID]

Configuration errors are reported before Spark starts; exit codes: 0 ok, 1 stage failed,
2 bad configuration or input.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from recsys.config import Config, ConfigError, default_env, load_config

logger = logging.getLogger("recsys")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--conf", default=None,
        help="environment name (conf/<name>.yaml) or a YAML file; default $RECSYS_ENV or 'local'",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--run-date", type=dt.date.fromisoformat, default=None, help="YYYY-MM-DD (default today, UTC)")
    parser.add_argument("--run-id", default=None, help="run id (default run-<run date>)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="recsys", description="Batch product recommender on Spark and Delta Lake.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "the daily refresh: ingest, train, behaviour, embed, neighbours, recommend, customers"),
        ("ingest", "read the source files into Delta (rejects to quarantine)"),
        ("train", "train the image encoder on the catalogue's images (petastorm → PyTorch)"),
        ("embed", "text, image, metadata and fused embeddings (incremental)"),
        ("neighbours", "top-K neighbours per modality with LSH, recall against exact"),
        ("recommend", "write item_recommendations from the fused neighbours"),
        ("behaviour", "item vectors from purchases (implicit ALS); skipped without transactions"),
        ("customers", "write customer_recommendations: top-K per customer with a reason"),
        ("evaluate", "time split: MAP@12, recall, NDCG, coverage against baselines; per-modality quality; HTML report"),
        ("maintain", "OPTIMIZE and VACUUM every table (maintain.retention_hours); not part of run"),
    ):
        stage = sub.add_parser(name, help=text)
        _common(stage)
        if name == "run":
            stage.add_argument("--evaluate", action="store_true", help="also run the evaluate stage at the end")
    similar = sub.add_parser("similar", help="print an article and its top-K recommendations")
    _common(similar)
    similar.add_argument("article_id")
    similar.add_argument("--modality", default=None, help="show item_neighbours of this modality instead")
    sql = sub.add_parser("sql", help="run a SQL query against the recsys tables")
    _common(sql)
    sql.add_argument("query")
    sql.add_argument("--limit", type=int, default=100, help="rows to print")
    metrics = sub.add_parser("metrics", help="print the metrics of a run (default: the latest)")
    _common(metrics)
    export = sub.add_parser(
        "export-submission", help="write customer_recommendations as the H&M submission CSV (customer_id,prediction)"
    )
    _common(export)
    export.add_argument("output", help="local CSV file to write")
    return parser


def configure_logging(verbose: bool = False) -> None:
    """Log lines with time and module to stderr; Spark's own logs stay at WARN."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.conf or default_env(), args.set)


def _show(rows: list[Any], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) if rows else len(c) for c in columns]
    sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)) + "\n")
    for r in rows:
        sys.stdout.write("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(columns, widths)) + "\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(value.items()))
    return "" if value is None else str(value)


def _similar(spark: Any, cfg: Config, article_id: str, modality: str | None) -> int:
    from pyspark.sql import functions as F

    from recsys import tables

    db = cfg.data.database
    articles = tables.read(spark, db, tables.ARTICLES)
    item = articles.where(F.col("article_id") == article_id).collect()
    if not item:
        sys.stderr.write(f"article_id {article_id!r} is not in {db}.articles\n")
        return 2
    a = item[0]
    sys.stdout.write(f"{a['article_id']}  {a['name']}  [{a['category_l3']} / {a['colour']}]\n")
    if modality:
        recs = tables.read(spark, db, tables.ITEM_NEIGHBOURS).where(
            (F.col("article_id") == article_id) & (F.col("modality") == modality)
        ).select("rank", F.col("neighbour_id").alias("recommended_id"), "score", "modality_scores")
    else:
        recs = tables.read(spark, db, tables.ITEM_RECOMMENDATIONS).where(F.col("article_id") == article_id)
    rows = (
        recs.join(
            articles.select(F.col("article_id").alias("recommended_id"), "name", "category_l3", "colour"),
            "recommended_id",
        )
        .orderBy("rank")
        .select("rank", "recommended_id", "name", "category_l3", "colour", "score", "modality_scores")
        .collect()
    )
    if not rows:
        sys.stdout.write("no recommendations for this article (run the pipeline first)\n")
        return 0
    _show(rows, ["rank", "recommended_id", "name", "category_l3", "colour", "score", "modality_scores"])
    return 0


def stage_job(stage_run: Callable[..., dict[str, Any]], argv: Sequence[str] | None = None) -> int:
    """What every ``jobs/<stage>.py`` calls: parse ``--conf``, ``--set``, ``--run-date``, ``--run-id``
    from ``argv`` (default ``sys.argv[1:]``), build the session, run ``stage_run`` (one
    ``recsys.stages.<stage>.run``) and record it in ``runs``; returns the exit code (see :func:`main`).

    Raises:
        ValueError: ``stage_run`` is not the ``run`` of a module in :mod:`recsys.stages`.
    """
    from recsys.stages import STAGES, stage_function

    name = stage_run.__module__.rsplit(".", 1)[-1]
    if name not in STAGES or stage_function(name) is not stage_run:
        raise ValueError(f"{stage_run.__module__}.{stage_run.__name__} is not a stage's run function")
    return main([name, *(sys.argv[1:] if argv is None else argv)])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recsys`` command and of every ``jobs/*.py``; returns the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        cfg = _load(args)
    except ConfigError as err:
        sys.stderr.write(f"configuration error:\n{err}\n")
        return 2

    from recsys.pipeline import RUN_STAGES, run
    from recsys.runlog import default_run_id
    from recsys.session import SparkStartError, build_spark
    from recsys.sources.base import SourceError
    from recsys.stages import STAGES

    try:
        spark = build_spark(cfg)
    except SparkStartError as err:
        sys.stderr.write(f"{err}\n")
        return 2
    run_id = args.run_id or default_run_id(args.run_date)
    try:
        if args.command in ("run", *STAGES):
            stages = ((*RUN_STAGES, "evaluate") if args.evaluate else RUN_STAGES) if args.command == "run" else (args.command,)
            report = run(spark, cfg, run_id, stages)
            logger.info("run %s report: %s", run_id, json.dumps(report, default=str))
            if args.command in ("run", "recommend"):
                _where(spark, cfg)
            return 0
        if args.command == "similar":
            return _similar(spark, cfg, args.article_id, args.modality)
        if args.command == "sql":
            df = spark.sql(args.query)
            rows = df.limit(args.limit).collect()
            _show(rows, df.columns)
            return 0
        if args.command == "metrics":
            return _metrics(spark, cfg, args.run_id)
        if args.command == "export-submission":
            return _export_submission(spark, cfg, args.output)
    except SourceError as err:
        sys.stderr.write(f"input error: {err}\n")
        return 2
    except Exception as err:
        logger.exception("%s failed: %s", args.command, err)
        return 1
    return 2


def _export_submission(spark: Any, cfg: Config, output: str) -> int:
    from recsys.customers import export_submission

    try:
        written = export_submission(spark, cfg, output)
    except ValueError as err:
        sys.stderr.write(f"{err}\n")
        return 2
    sys.stdout.write(f"wrote {written} customers to {output}\n")
    return 0


def _metrics(spark: Any, cfg: Config, run_id: str | None) -> int:
    from pyspark.sql import functions as F

    from recsys import tables

    db = cfg.data.database
    if run_id is None:
        latest = tables.read(spark, db, tables.RUNS).orderBy(F.col("started_at").desc()).limit(1).collect()
        if not latest:
            sys.stdout.write("no runs recorded yet\n")
            return 0
        run_id = latest[0]["run_id"]
    rows = tables.read(spark, db, tables.METRICS).where(F.col("run_id") == run_id).orderBy("name").collect()
    sys.stdout.write(f"metrics of {run_id}\n")
    _show(rows, ["name", "value"])
    quality = quality_table({r["name"]: r["value"] for r in rows})
    if quality:
        sys.stdout.write("\nquality per modality\n")
        _show(quality, list(quality[0]))
    return 0


QUALITY_COLUMNS = (
    ("recall_at_k", "recall@K"),
    ("category_precision_at_k", "category_precision@K"),
    ("category_precision_common_at_k", "same, common articles"),
    ("probe_macro_f1", "probe_macro_f1"),
    ("probe_accuracy", "probe_accuracy"),
    ("articles", "articles"),
)


def quality_table(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """One row per modality from ``neighbours.<modality>.<figure>`` metrics (missing: blank)."""
    modalities = sorted(
        {n.split(".")[1] for n in metrics if n.startswith("neighbours.") and n.count(".") == 2
         and n.endswith(".category_precision_at_k")},
        key=lambda m: (m != "fused", m),
    )
    table = []
    for m in modalities:
        row: dict[str, Any] = {"modality": m}
        for key, title in QUALITY_COLUMNS:
            value = metrics.get(f"neighbours.{m}.{key}")
            row[title] = int(value) if key == "articles" and value is not None else value
        table.append(row)
    return table


def _where(spark: Any, cfg: Config) -> None:
    from recsys import tables
    from recsys.session import under_spark_submit, warehouse_path

    db = cfg.data.database
    example = tables.read(spark, db, tables.ITEM_RECOMMENDATIONS).select("article_id").limit(1).collect()
    article = example[0]["article_id"] if example else "<article_id>"
    location = tables.location(spark, db, tables.ITEM_RECOMMENDATIONS)
    conf = "" if cfg.data.source == "fashion_products" and cfg.data.path == "data/sample/fashion" else " --conf <same --conf/--set as the run>"
    lines = [
        "",
        f"Recommendation tables are in the catalog database '{db}'"
        + ("" if under_spark_submit() else f" (warehouse {warehouse_path(cfg)})") + ":",
        f"  {db}.item_recommendations  {location}",
        f"  {db}.customer_recommendations (when there are transactions), {db}.item_neighbours, {db}.item_embeddings,",
        f"  {db}.articles, {db}.quarantine, {db}.runs, {db}.metrics",
        "Query them:",
        f"  .venv/bin/recsys similar {article}{conf}",
        f"  .venv/bin/recsys sql \"SELECT * FROM {db}.item_recommendations WHERE article_id = '{article}' ORDER BY rank\"{conf}",
        f"  .venv/bin/recsys metrics{conf}",
        "",
    ]
    sys.stdout.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
