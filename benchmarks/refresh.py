"""The daily refresh: a full run of day N, the incremental run of day N+1, a rerun with nothing
changed, and the check of day N+1 against a full recompute.

Day N is the H&M catalogue (or its first ``--articles`` articles) without a held-back 1% of
articles and with the transactions before the last day; day N+1 adds the held-back articles (and
their images), changes 0.5% of the descriptions, removes 0.2% of the articles and adds the last
day of transactions. Both days are written in turn into one source folder, as a daily export
would update it, and run into database ``refresh_a``; database ``refresh_b`` then runs day N+1 from
scratch with the same fitted models (the LSH index, with ``knn.recompute``, the metadata
vocabulary and the ALS factors, which the daily run refits weekly; :func:`copy_fitted`), and every
output table of the two is compared (bookkeeping columns left out, floats rounded to 5 decimals).

    .venv/bin/python -m benchmarks.refresh --data ../shared/data/hm --work /tmp/refresh \
        [--articles 5000] [--conf hm] [--set key=value ...] [--no-recompute] [--replay]

``--replay`` measures day N+1 again on the warehouse of an earlier run of the command with the same
``--work`` (its day N kept: ``day_n.json`` there holds day N's table versions and timings): every
table of ``refresh_a`` is restored to its day-N version (Delta ``RESTORE``), then the incremental
run and the rerun are timed and set beside the stored day N. It saves the half hour of day N when
only the daily path changed; a fresh session runs day N+1, where the full run's session ran it
after day N (encoders and Python workers warm).

Prints wall time per stage for the three runs, the ratio incremental / full, and per table the
rows of each database and the rows that differ: exactly, and by key as float noise, near-tie order
or real differences (:func:`compare_tables`). Exits 1 when a real difference is found.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, FloatType, MapType, StructField

from recsys import state, tables

COMPARED = (
    tables.ARTICLES, tables.CUSTOMERS, tables.TRANSACTIONS, tables.ITEM_EMBEDDINGS, tables.ITEM_NEIGHBOURS,
    tables.ITEM_RECOMMENDATIONS, tables.CUSTOMER_RECOMMENDATIONS,
)
CHANGED_TEXT = " Now in organic cotton."


@dataclass(frozen=True)
class Days:
    """Which articles day N+1 adds, changes and removes, and the day of transactions it adds."""

    ids: tuple[str, ...]
    held_back: frozenset[str]
    changed: frozenset[str]
    removed: frozenset[str]
    last_day: dt.date


def plan_days(source: Path, n_articles: int | None, held_back: float = 0.01, changed: float = 0.005,
              removed: float = 0.002, seed: int = 0) -> Days:
    """Choose day N+1's new, changed and removed articles (each share of the slice, at least one).

    Args:
        source: an H&M folder (``articles.csv``, ``transactions_train.csv``, ...).
        n_articles: the first this many articles of ``articles.csv`` (None: all).
        held_back, changed, removed: shares of the slice. The held-back (new) articles are
            chosen among those with an image, and their purchases are left out of both days (a new
            article has no past); removed articles are chosen among those never bought, so that
            no past day of transactions changes.

    Returns:
        The plan; ``last_day`` is the newest transaction date of the slice (day N+1 adds it).
    """
    ids = tuple(r["article_id"] for r in _articles(source)[:n_articles])
    chosen = set(ids)
    bought: dict[str, dt.date] = {}  # article: its last purchase
    with open(source / "transactions_train.csv", encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            day, _, article, *_ = line.split(",")
            if article in chosen:
                bought[article] = max(bought.get(article, dt.date.min), dt.date.fromisoformat(day))
    rng = random.Random(seed)

    def pick(pool: list[str], share: float) -> set[str]:
        return set(rng.sample(sorted(pool), min(len(pool), max(1, round(share * len(ids))))))

    with_image = [a for a in ids if (source / "images" / a[:3] / f"{a}.jpg").is_file()]
    new = pick(with_image or list(ids), held_back)
    gone = pick([a for a in ids if a not in bought and a not in new], removed)
    edits = pick([a for a in ids if a not in new and a not in gone], changed)
    last = max(d for a, d in bought.items() if a not in new)
    return Days(ids, frozenset(new), frozenset(edits), frozenset(gone), last)


def _articles(source: Path) -> list[dict[str, str]]:
    with open(source / "articles.csv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def write_day(source: Path, target: Path, days: Days, next_day: bool) -> None:
    """Write day N (``next_day`` false) or day N+1 into ``target``, replacing what is there as a
    daily export would: ``articles.csv``, ``customers.csv``, ``transactions_train.csv`` and
    ``images/0XX/<article_id>.jpg`` (symbolic links to the source images)."""
    target.mkdir(parents=True, exist_ok=True)
    keep = set(days.ids) - (days.removed if next_day else days.held_back)
    with open(source / "articles.csv", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [r for r in reader if r["article_id"] in keep]
        header = reader.fieldnames or []
    if next_day:
        for r in rows:
            if r["article_id"] in days.changed:
                r["detail_desc"] = (r["detail_desc"] or "") + CHANGED_TEXT
    with open(target / "articles.csv", "w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    customers: set[str] = set()
    sliced = set(days.ids)
    with open(source / "transactions_train.csv", encoding="utf-8") as handle, \
            open(target / "transactions_train.csv", "w", encoding="utf-8") as out:
        out.write(next(handle))
        for line in handle:
            day, customer, article, *_ = line.split(",")
            if article in keep and article not in days.held_back and (
                    next_day or dt.date.fromisoformat(day) < days.last_day):
                out.write(line)
            if article in sliced:
                customers.add(customer)
    with open(source / "customers.csv", encoding="utf-8") as handle, \
            open(target / "customers.csv", "w", encoding="utf-8") as out:
        out.write(next(handle))
        out.writelines(line for line in handle if line.split(",", 1)[0] in customers)
    images = target / "images"
    shutil.rmtree(images, ignore_errors=True)
    for article in keep:
        image = source / "images" / article[:3] / f"{article}.jpg"
        if image.is_file():
            (images / article[:3]).mkdir(parents=True, exist_ok=True)
            (images / article[:3] / f"{article}.jpg").symlink_to(image.resolve())


def canonical(df: DataFrame, digits: int = 5) -> DataFrame:
    """``df`` without bookkeeping columns (:data:`recsys.tables.BOOKKEEPING`), floats rounded to
    ``digits`` decimals (in arrays and map values too) and maps as sorted entry arrays, so that
    two tables can be compared with ``exceptAll``."""
    columns: list[Column] = []
    for field in df.schema.fields:
        if field.name in tables.BOOKKEEPING:
            continue
        c, kind = F.col(field.name), field.dataType
        if isinstance(kind, (FloatType, DoubleType)):
            c = F.round(c, digits)
        elif isinstance(kind, ArrayType) and isinstance(kind.elementType, (FloatType, DoubleType)):
            c = F.transform(c, lambda x: F.round(x, digits))
        elif isinstance(kind, MapType):
            if isinstance(kind.valueType, (FloatType, DoubleType)):
                c = F.transform_values(c, lambda _k, v: F.round(v, digits))
            c = F.array_sort(F.map_entries(c))
        columns.append(c.alias(field.name))
    return df.select(*columns)


def _close(field: StructField, a: Column, b: Column, tolerance: float) -> Column:
    """SQL: ``a`` and ``b`` (one column of the two tables) are equal, floats within ``tolerance``
    (elementwise in arrays, per key in maps); nulls equal only nulls."""
    kind = field.dataType
    if isinstance(kind, (FloatType, DoubleType)):
        near = F.abs(a - b) <= tolerance
    elif isinstance(kind, ArrayType) and isinstance(kind.elementType, (FloatType, DoubleType)):
        near = (F.size(a) == F.size(b)) & F.forall(F.zip_with(a, b, lambda x, y: F.abs(x - y) <= tolerance),
                                                   lambda ok: ok)
    elif isinstance(kind, MapType) and isinstance(kind.valueType, (FloatType, DoubleType)):
        near = (F.array_sort(F.map_keys(a)) == F.array_sort(F.map_keys(b))) & F.forall(
            F.map_keys(a), lambda k: F.abs(a[k] - b[k]) <= tolerance)
    elif isinstance(kind, MapType):
        return F.array_sort(F.map_entries(a)).eqNullSafe(F.array_sort(F.map_entries(b)))
    else:
        return a.eqNullSafe(b)
    return (a.isNull() & b.isNull()) | F.coalesce(near, F.lit(False))


def compare_tables(spark: SparkSession, db_a: str, db_b: str, tolerance: float = 1e-5,
                   specs: tuple[tables.TableSpec, ...] = COMPARED, by_key: bool = True) -> dict[str, dict[str, int]]:
    """Per output table: rows in each database, rows of each that the other lacks, and how the
    differing rows differ.

    Two comparisons, bookkeeping columns (:data:`recsys.tables.BOOKKEEPING`) left out:

    - exact: ``only_a``, ``only_b`` are the rows of one that the other lacks, floats rounded to 5
      decimals (:func:`canonical`).
    - by key (the table's key, a full outer join): ``noise`` rows equal but for floats within
      ``tolerance`` (encoders give float32 results that depend on what else is in the batch);
      ``ties`` rows of a ranked list whose ``score`` is within ``tolerance`` but whose item
      differs (two near-equal candidates ordered the other way); ``differ`` every other key
      that is missing on one side or differs.

    Returns:
        ``{table: {rows_a, rows_b, only_a, only_b, noise, ties, differ}}``; equal tables have
        ``only_a == only_b == 0``; tables equal up to float noise have ``differ == 0``. Without
        ``by_key`` only the exact counts (``rows_*``, ``only_*``).
    """
    out = {}
    for spec in specs:
        a = canonical(tables.read(spark, db_a, spec)).persist()
        b = canonical(tables.read(spark, db_b, spec)).persist()
        counts = {"rows_a": a.count(), "rows_b": b.count(), "only_a": a.exceptAll(b).count(),
                  "only_b": b.exceptAll(a).count()}
        a.unpersist()
        b.unpersist()
        if not by_key:
            out[spec.name] = counts
            continue
        fields = [f for f in spec.schema.fields if f.name not in tables.BOOKKEEPING and f.name not in spec.key]
        left = tables.read(spark, db_a, spec).select(*spec.key, *[F.col(f.name).alias(f"a_{f.name}") for f in fields],
                                                      F.lit(True).alias("in_a"))
        right = tables.read(spark, db_b, spec).select(*spec.key, *[F.col(f.name).alias(f"b_{f.name}") for f in fields],
                                                       F.lit(True).alias("in_b"))
        joined = left.join(right, list(spec.key), "full_outer")
        both = F.coalesce(F.col("in_a"), F.lit(False)) & F.coalesce(F.col("in_b"), F.lit(False))
        close, exact = F.lit(True), F.lit(True)
        for f in fields:
            a_col, b_col = F.col(f"a_{f.name}"), F.col(f"b_{f.name}")
            close, exact = close & _close(f, a_col, b_col, tolerance), exact & _close(f, a_col, b_col, 0.0)
        score = next((f for f in fields if f.name == "score"), None)
        tie = _close(score, F.col("a_score"), F.col("b_score"), tolerance) if score else F.lit(False)
        kinds = joined.select(
            F.when(~both, "differ").when(exact, "equal").when(close, "noise").when(tie, "ties").otherwise("differ")
            .alias("kind"))
        found = {r["kind"]: int(r["count"]) for r in kinds.groupBy("kind").count().collect()}
        out[spec.name] = {**counts, **{k: found.get(k, 0) for k in ("noise", "ties", "differ")}}
    return out


def copy_fitted(spark: SparkSession, db_from: str, db_to: str) -> None:
    """Put ``db_from``'s fitted models into the empty database ``db_to``: the saved LSH indexes,
    the metadata vocabulary (labels keep their one-hot slots from day to day) and the ALS
    behaviour vectors with the behaviour stage's record (which the daily run keeps between
    refits). A full run of ``db_to`` then recomputes everything else from its inputs with the
    same models, which is what an incremental run of ``db_from`` must equal."""
    tables.ensure_tables(spark, db_to)
    tables.replace(spark, db_to, tables.LSH_INDEX, tables.read(spark, db_from, tables.LSH_INDEX), "true")
    vocabulary = tables.read(spark, db_from, tables.MODELS).where("modality = 'metadata'")
    tables.replace(spark, db_to, tables.MODELS, vocabulary, "modality = 'metadata'")
    behaviour = tables.read(spark, db_from, tables.ITEM_EMBEDDINGS).where("modality = 'behaviour'")
    tables.replace(spark, db_to, tables.ITEM_EMBEDDINGS, behaviour, "modality = 'behaviour'")
    record = tables.read(spark, db_from, tables.STAGE_STATE).where("stage = 'behaviour'")
    tables.replace(spark, db_to, tables.STAGE_STATE, record, "stage = 'behaviour'")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="an H&M folder (articles.csv, images/, ...)")
    parser.add_argument("--work", required=True, type=Path, help="scratch folder: source files and warehouse")
    parser.add_argument("--articles", type=int, default=None, help="the first N articles only (default: all)")
    parser.add_argument("--conf", default="hm")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-recompute", action="store_true",
                        help="time day N, day N+1 and the rerun only: no recompute, no equality check")
    parser.add_argument("--replay", action="store_true",
                        help="reuse --work's day N (restored to its versions) and time day N+1 and the rerun again")
    args = parser.parse_args(argv)

    from recsys.cli import configure_logging
    from recsys.config import load_config
    from recsys.pipeline import RUN_STAGES, run
    from recsys.runlog import default_run_id
    from recsys.session import build_spark

    configure_logging()
    saved = args.work / "day_n.json"
    if args.replay and not saved.exists():
        parser.error(f"--replay: {saved} is missing; run without --replay first (it writes day N there)")
    if not args.replay:
        shutil.rmtree(args.work, ignore_errors=True)
    source, files = args.data.resolve(), args.work / "source"
    days = plan_days(source, args.articles)
    print(f"{len(days.ids):,} articles; day N+1 adds {len(days.held_back)}, changes {len(days.changed)}, removes "
          f"{len(days.removed)} and adds the purchases of {days.last_day}", flush=True)

    def config(db: str, *extra: str) -> Any:
        return load_config(args.conf, [f"data.path={files}", f"spark.warehouse_dir={args.work / 'warehouse'}",
                                       f"data.database={db}", f"train.output_dir={args.work / 'models'}",
                                       f"evaluate.report_dir={args.work / 'reports'}", *args.set, *extra])

    day_n, day_n1 = default_run_id(days.last_day), default_run_id(days.last_day + dt.timedelta(days=1))
    spark = build_spark(config("refresh_a"))
    timings: dict[str, dict[str, float]] = {}

    def timed(name: str, cfg: Any, run_id: str) -> dict[str, Any]:
        started = time.perf_counter()
        report = run(spark, cfg, run_id, RUN_STAGES)
        timings[name] = {stage: report[stage]["seconds"] for stage in RUN_STAGES}
        timings[name]["total"] = time.perf_counter() - started
        print(f"{name}: {timings[name]['total']:.1f} s", flush=True)
        return report

    if args.replay:
        day = json.loads(saved.read_text())
        if day.get("articles") != args.articles:
            parser.error(f"--replay: {saved} holds a day N of --articles {day.get('articles')}, not {args.articles}")
        timings["full N"] = day["timings"]
        specs = {spec.name: spec for spec in tables.ALL_TABLES}
        for table, version in day["versions"].items():
            if state.table_version(spark, "refresh_a", specs[table]) != version:
                spark.sql(f"RESTORE TABLE refresh_a.{table} TO VERSION AS OF {version}")
        print(f"day N restored ({saved}): full N {timings['full N']['total']:.1f} s", flush=True)
    else:
        write_day(source, files, days, next_day=False)
        timed("full N", config("refresh_a"), day_n)
        saved.write_text(json.dumps({"articles": args.articles, "timings": timings["full N"], "versions": {
            spec.name: state.table_version(spark, "refresh_a", spec) for spec in tables.ALL_TABLES}}))
    write_day(source, files, days, next_day=True)
    incremental = timed("incremental N+1", config("refresh_a"), day_n1)
    timed("rerun N+1", config("refresh_a"), day_n1)
    names = ["full N", "incremental N+1", "rerun N+1"]
    if not args.no_recompute:
        copy_fitted(spark, "refresh_a", "refresh_b")
        timed("recompute N+1", config("refresh_b", "knn.recompute=true"), day_n1)
        names.append("recompute N+1")
    print(f"\n{'stage':<12}" + "".join(f"{n:>17}" for n in names) + f"{'incr./full':>12}")
    for stage in (*RUN_STAGES, "total"):
        row = [timings[n][stage] for n in names]
        print(f"{stage:<12}" + "".join(f"{v:>17.1f}" for v in row) + f"{row[1] / max(row[0], 1e-9):>12.2f}")
    print(f"{'total - train':<12}" + "".join(f"{timings[n]['total'] - timings[n]['train']:>17.1f}" for n in names)
          + f"{(timings[names[1]]['total'] - timings[names[1]]['train']) / max(timings[names[0]]['total'] - timings[names[0]]['train'], 1e-9):>12.2f}")
    print("\nneighbours per modality, incremental N+1 (mode, seconds, reason):", json.dumps(
        {m: (v.get("mode"), v.get("seconds"), v.get("reason")) for m, v in incremental["neighbours"].items()
         if isinstance(v, dict)}, indent=1),
        f"\n  one write for all modalities {incremental['neighbours'].get('write_seconds')} s, "
        f"measures {incremental['neighbours'].get('measure_seconds')} s")
    print("embed, incremental N+1 (seconds; metadata encoded, fused):", json.dumps(
        {m: v.get("seconds") for m, v in incremental["embed"].items() if isinstance(v, dict)}),
        incremental["embed"].get("metadata", {}).get("encoded"), incremental["embed"].get("fused", {}).get("fused"))
    if args.no_recompute:
        spark.stop()
        return 0
    equal = compare_tables(spark, "refresh_a", "refresh_b")
    print(f"\n{'table':<26}{'rows (incr.)':>14}{'rows (full)':>14}{'only incr.':>12}{'only full':>12}"
          f"{'noise':>8}{'ties':>8}{'differ':>8}")
    for name, c in equal.items():
        print(f"{name:<26}{c['rows_a']:>14,}{c['rows_b']:>14,}{c['only_a']:>12,}{c['only_b']:>12,}"
              f"{c['noise']:>8,}{c['ties']:>8,}{c['differ']:>8,}")
    same = all(c["only_a"] == c["only_b"] == 0 for c in equal.values())
    close = all(c["differ"] == 0 for c in equal.values())
    print("\nincremental N+1 equals the full recompute:",
          "yes" if same else "up to float noise (|difference| <= 1e-5: vectors, scores, near-tie order)" if close else "NO")
    spark.stop()
    return 0 if close else 1


if __name__ == "__main__":
    sys.exit(main())
