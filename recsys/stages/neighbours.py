"""Neighbours stage: top-K per modality into ``item_neighbours`` (:mod:`recsys.knn`), with quality figures."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys import state, tables
from recsys.config import Config
from recsys.evaluation.probe import linear_probe
from recsys.fusion import current_model_ids, current_vectors, load_layout
from recsys.knn import LSHParams, MLlibParams, Segments, fit_index, recall_at_k, top_k, update_top_k
from recsys.knn.index import SavedIndex, add_drift, load_index, save_index

logger = logging.getLogger(__name__)

# modalities searched at once (threads of the driver, each submitting its own Spark jobs): on
# the H&M update day two took the stage's searches from 150 s to 113 s on 2 cores
MODALITY_THREADS = 2
_SAVE_INDEX = threading.Lock()  # lsh_index is one unpartitioned table: one writer at a time

STAGE = "neighbours"


def run(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Top-K neighbours for each configured modality (``cfg.knn.modalities``).

    Every modality's new lists are computed first (:data:`MODALITY_THREADS` modalities at a time,
    each in a driver thread of its own), then the written modalities' slices of
    ``item_neighbours`` are replaced in one commit (:func:`_write`: a reader sees every modality
    of the last run or of this one; an unchanged list keeps its rows and ``run_id``). For the
    fused vectors, each pair also carries the cosine in every modality (``modality_scores``).

    Quality per modality: category precision@K over its lists and over those of the articles
    that have every modality (``common``, where modalities compare like for like), measured for
    every written modality in one pass after the write; on a full search also recall@K (LSH
    against exact on ``cfg.knn.recall_sample`` queries) and a linear probe
    (:func:`recsys.evaluation.probe.linear_probe`) on the common articles. An update measures
    category precision on the lists it rewrote (``measured_on``) and no recall or probe (the
    index and the vectors' model are those the full run measured).

    A daily refresh (``lsh``): the index fitted on a full run is saved (``lsh_index``) and the
    versions of ``item_embeddings`` and ``articles`` it read are recorded (``stage_state``). The
    next run compares the vectors with those versions, every modality in one pass
    (:func:`changes_since`): none of a modality's vectors changed, nothing of it is searched or
    written; a few changed (at most ``knn.refit_share`` of the vectors since the index was fitted,
    summed over the runs in ``lsh_index.changed_since_fit``), only the lists they alter are rewritten
    with the saved index (:func:`recsys.knn.update_top_k`, equal to a full recompute with that
    index; the other lists are copied as they were); otherwise, or when
    the model, the settings or the index's age (``knn.refit_days``) call for it, the index is
    refitted and every list recomputed (:func:`plan`).

    Returns:
        Per modality: ``mode`` (full, update, unchanged) and its ``reason``, ``changed`` and
        ``removed`` vectors, ``index_id``, ``articles``, ``rows``, ``seconds`` (the search; the
        write and the measures are in ``write_seconds`` and ``measure_seconds``),
        ``recall_at_k``, ``category_precision_at_k``, ``category_precision_common_at_k``,
        ``probe_macro_f1``, ``probe_accuracy`` (full mode only); an update's ``largest_bucket``
        (measured) or ``largest_bucket_bound`` (not measured: no bucket can have outgrown
        ``max_bucket_size``) and ``on_driver`` (computed on the driver: :func:`fits_driver`);
        and ``common_articles``.
    """
    db = cfg.data.database
    versions = {"item_embeddings": state.table_version(spark, db, tables.ITEM_EMBEDDINGS),
                "articles": state.table_version(spark, db, tables.ARTICLES)}
    # where an update runs (driver or executors) gives the same lists: not a reason to recompute
    settings = {"knn": state.fingerprint(cfg.knn.model_dump(mode="json", exclude={"driver_update_mb"}))}
    last = state.consumed(spark, db, STAGE)
    previous = last if last.versions and last.fingerprints == settings else None
    model_ids = current_model_ids(spark, cfg)
    report: dict[str, Any] = {"k": cfg.knn.k, "backend": cfg.knn.backend}
    base = sorted(m for m in model_ids if m != "fused")
    common = (
        current_vectors(spark, cfg, {m: model_ids[m] for m in base})
        .groupBy("article_id")
        .agg(F.countDistinct("modality").alias("n"))
        .where(F.col("n") == len(base))
        .select("article_id")
        .persist()
    )
    wanted = {m: model_ids[m] for m in cfg.knn.modalities if m in model_ids}
    changes: Changes | None = None
    written: list[Written] = []
    try:
        if previous is not None and cfg.knn.backend == "lsh" and not cfg.knn.recompute:
            changes = changes_since(spark, cfg, wanted, previous)
        report["common_articles"] = common.count()
        def one(modality: str) -> tuple[dict[str, Any], Written | None]:
            # cached by _neighbours_of for a full search, which reads them several times
            vectors = current_vectors(spark, cfg, {modality: model_ids[modality]}).select("article_id", "vector")
            try:
                return _neighbours_of(spark, cfg, run_id, modality, vectors, common, model_ids, previous, changes)
            finally:
                vectors.unpersist()

        present = [m for m in cfg.knn.modalities if m in model_ids]
        for modality in sorted(set(cfg.knn.modalities) - set(present)):
            logger.info("neighbours %s: no vectors (modality off or not embedded), skipped", modality)
        # modalities side by side: each one's Spark jobs fill the cores the other leaves idle
        # while its driver collects, plans or commits (the write below waits for all of them)
        with concurrent.futures.ThreadPoolExecutor(MODALITY_THREADS, thread_name_prefix="neighbours") as pool:
            results = list(pool.map(one, present))
        for modality, (entry, out) in zip(present, results, strict=True):
            report[modality] = entry
            if out is not None:
                written.append(out)
        if written:
            started = time.perf_counter()
            _write(spark, db, written)
            add_drift(spark, db, {w.modality: report[w.modality]["changed"] + report[w.modality]["removed"]
                                  for w in written if report[w.modality]["mode"] == "update"})
            report["write_seconds"] = round(time.perf_counter() - started, 2)
            started = time.perf_counter()
            for modality, figures in measure(spark, cfg, written, common).items():
                report[modality].update(figures)
                logger.info("neighbours %s: %d articles, %d rows, category precision@%d %.3f (common articles %.3f)",
                            modality, figures["articles"], figures["rows"], cfg.knn.k,
                            figures["category_precision_at_k"], figures["category_precision_common_at_k"])
            report["measure_seconds"] = round(time.perf_counter() - started, 2)
    finally:
        common.unpersist()
        if changes is not None:
            changes.changed.unpersist()
    state.record(spark, db, STAGE, run_id, versions, settings)
    return report


@dataclass(frozen=True)
class Changes:
    """What changed in ``item_embeddings`` and ``articles`` since the versions the last run read,
    for each modality's current model (:func:`changes_since`).

    Attributes:
        changed: ``(modality, article_id)`` of every new or changed vector (persisted).
        n_changed, n_removed: per modality, new or changed vectors and removed ones (absent: 0).
        listed: the modalities that have lists in ``item_neighbours``.
    """

    changed: DataFrame
    n_changed: dict[str, int]
    n_removed: dict[str, int]
    listed: frozenset[str]


def changes_since(spark: SparkSession, cfg: Config, model_ids: dict[str, str],
                  previous: state.Consumed) -> Changes | None:
    """The new, changed and removed vectors of every modality in ``model_ids`` (with that model)
    since the versions of ``item_embeddings`` and ``articles`` that ``previous`` consumed, in one
    pass: a vector is a function of its model and ``content_hash`` (every writer of
    ``item_embeddings`` keeps that true), so ``(modality, article_id, content_hash)`` compared
    at both versions tells what changed without reading a vector.

    Returns:
        :class:`Changes` (its ``changed`` persisted: unpersist it), or None when those versions
        can no longer be read (vacuumed).
    """
    db = cfg.data.database
    old_embeddings = state.as_of(spark, db, tables.ITEM_EMBEDDINGS, previous.versions["item_embeddings"])
    old_articles = state.as_of(spark, db, tables.ARTICLES, previous.versions["articles"])
    if old_embeddings is None or old_articles is None or not model_ids:
        return None
    current = F.lit(False)
    for modality, mid in model_ids.items():
        current = current | ((F.col("modality") == modality) & (F.col("model_id") == mid))

    def hashes(embeddings: DataFrame, articles: DataFrame) -> DataFrame:
        return (embeddings.where(current).join(articles.select("article_id"), "article_id", "left_semi")
                .select("modality", "article_id", F.coalesce("content_hash", F.lit("")).alias("content_hash")))

    old = hashes(old_embeddings, old_articles)
    now = hashes(tables.read(spark, db, tables.ITEM_EMBEDDINGS), tables.read(spark, db, tables.ARTICLES))
    changed = now.join(old, ["modality", "article_id", "content_hash"], "left_anti").select(
        "modality", "article_id").persist()
    removed = old.select("modality", "article_id").join(now, ["modality", "article_id"], "left_anti")
    try:
        counts = (changed.withColumn("kind", F.lit("changed")).unionByName(removed.withColumn("kind", F.lit("removed")))
                  .groupBy("modality", "kind").count().collect())
        listed = tables.read(spark, db, tables.ITEM_NEIGHBOURS).select("modality").distinct().collect()
    except BaseException:
        changed.unpersist()  # nothing of a failed detection stays in the session's cache
        raise
    return Changes(changed,
                   {r["modality"]: int(r["count"]) for r in counts if r["kind"] == "changed"},
                   {r["modality"]: int(r["count"]) for r in counts if r["kind"] == "removed"},
                   frozenset(r["modality"] for r in listed))


@dataclass(frozen=True)
class Plan:
    """How a modality's lists are brought up to date: ``full`` (fit the index when ``lsh``, search
    every article), ``update`` (:func:`recsys.knn.update_top_k` with the saved index) or
    ``unchanged`` (no vector changed since the last run)."""

    mode: str
    reason: str
    saved: SavedIndex | None = None
    changed: DataFrame | None = None
    previous: DataFrame | None = None
    n_changed: int = 0
    n_removed: int = 0


def plan(
    spark: SparkSession, cfg: Config, modality: str, model_id: str, previous: state.Consumed | None,
    segments: Segments, changes: Changes | None,
) -> Plan:
    """Decide how to bring ``modality``'s lists up to date (see :class:`Plan` and ``knn.refit_*``).

    ``changes`` (:func:`changes_since`, None when the versions the last run read are gone) gives
    the new or changed vectors and the removed articles. With ``knn.recompute`` a usable saved
    index is kept but every list is searched again (``full`` with ``saved``): what an update
    must equal.
    """
    db = cfg.data.database
    if cfg.knn.backend != "lsh":
        return Plan("full", f"backend {cfg.knn.backend} keeps no index")
    if previous is None and not cfg.knn.recompute:
        return Plan("full", "no previous run with these knn settings")
    saved = load_index(spark, db, modality)
    params = LSHParams(**cfg.knn.lsh.model_dump())
    if saved is None:
        return Plan("full", "no saved index")
    if saved.model_id != model_id:
        return Plan("full", f"the vectors' model changed ({saved.model_id} → {model_id})")
    if saved.index.params != params.resolved(saved.articles):
        return Plan("full", "the lsh settings changed")
    age = dt.datetime.now() - saved.fitted_at
    if cfg.knn.refit_days and age > dt.timedelta(days=cfg.knn.refit_days):
        return Plan("full", f"the index is {age.days} days old (knn.refit_days {cfg.knn.refit_days})")
    if cfg.knn.recompute:
        return Plan("full", "knn.recompute: every list searched again with the saved index", saved)
    if changes is None:
        return Plan("full", "the versions the last run read are no longer readable")
    if modality not in changes.listed:
        return Plan("full", "no previous lists")
    n_changed, n_removed = changes.n_changed.get(modality, 0), changes.n_removed.get(modality, 0)
    if n_changed == 0 and n_removed == 0:
        return Plan("unchanged", "no vector changed since the last run")
    # drift: the vectors changed since the fit, this run's included, against those it was fitted on
    share = (saved.changed_since_fit + n_changed + n_removed) / max(1, saved.articles)
    if share > cfg.knn.refit_share:
        return Plan("full", f"{share:.1%} of the vectors changed since the index was fitted "
                    f"(knn.refit_share {cfg.knn.refit_share:.0%})", n_changed=n_changed, n_removed=n_removed)
    nan = F.lit(float("nan")).cast("float")
    segment_scores = (
        [F.array(*[F.coalesce(F.col("modality_scores")[m], nan) for m, _, _ in segments]).alias("segment_scores")]
        if segments else []
    )
    lists = tables.read(spark, db, tables.ITEM_NEIGHBOURS).where(F.col("modality") == modality)
    previous_lists = lists.select("article_id", "rank", "neighbour_id", "score", *segment_scores)
    changed = changes.changed.where(F.col("modality") == modality).select("article_id")
    return Plan("update", f"{n_changed} new or changed and {n_removed} removed vectors", saved, changed,
                previous_lists, n_changed, n_removed)


@dataclass(frozen=True)
class Written:
    """One modality's new rows for ``item_neighbours`` (:func:`_write`).

    Attributes:
        modality: the modality.
        rows: the table's columns; the whole slice (``replaced`` None) or the rewritten lists.
        replaced: an update's superseded lists (``article_id``: rewritten or removed), None for a
            full slice.
    """

    modality: str
    rows: DataFrame
    replaced: DataFrame | None


def _write(spark: SparkSession, db: str, written: list[Written]) -> None:
    """Replace the written modalities' slices of ``item_neighbours`` in one commit
    (``replaceWhere`` on the ``modality`` partitions): a full slice as it is; an update's slice
    is the table's rows of that modality without the superseded lists, plus the new lists.

    One read and one write of the slices: on the H&M update day (18% of the lists of four
    modalities rewritten, spread over every file) the MERGE it replaces took 45-55 s, joining
    the table with the new rows twice (to find the files to rewrite, then to rewrite them), where
    this takes 12-18 s. The price: the change data feed shows the slices' rows as deleted and
    inserted, not the changed rows only (no stage reads it: ``recommend`` compares the lists).
    """
    current = tables.read(spark, db, tables.ITEM_NEIGHBOURS)
    columns = [f.name for f in tables.ITEM_NEIGHBOURS.schema.fields]
    parts = []
    for w in written:
        if w.replaced is None:
            parts.append(w.rows.select(*columns))
            continue
        kept = current.where(F.col("modality") == w.modality).join(F.broadcast(w.replaced), "article_id", "left_anti")
        parts.append(kept.select(*columns).unionByName(w.rows.select(*columns)))
    rows = functools.reduce(DataFrame.unionByName, parts)
    slices = ", ".join(tables.sql_string(w.modality) for w in written)
    tables.replace(spark, db, tables.ITEM_NEIGHBOURS, rows, f"modality IN ({slices})")


def measure(spark: SparkSession, cfg: Config, written: list[Written], common: DataFrame,
            column: str = "category_l3") -> dict[str, dict[str, Any]]:
    """Rows, articles and category precision@K of the written modalities: the counts in one
    pass over their slices of ``item_neighbours``, the precision over the measured lists only.

    Category precision is the share of (article, neighbour) pairs whose ``column`` (default:
    product type) is equal, over the measured lists (all of a full slice, read from the table;
    the lists an update rewrote, read from its ``Written.rows``), and over
    those of them whose article is in ``common``.

    Returns:
        Per modality: ``articles``, ``rows``, ``measured_on``, ``category_precision_at_k``,
        ``category_precision_common_at_k`` (NaN without a pair whose categories are known).
    """
    db = cfg.data.database
    modalities = [w.modality for w in written]
    whole = [w.modality for w in written if w.replaced is None]
    lists = tables.read(spark, db, tables.ITEM_NEIGHBOURS).where(F.col("modality").isin(modalities))
    sizes = {r["modality"]: r for r in lists.groupBy("modality").agg(
        F.count(F.lit(1)).alias("rows"), F.countDistinct("article_id").alias("articles")).collect()}
    # the measured lists: a full slice as written, an update's rewritten lists as it wrote them
    # (its rows, a local checkpoint: no join of the whole slice to find them)
    parts = [lists.where(F.col("modality").isin(whole))] if whole else []
    parts += [w.rows for w in written if w.replaced is not None]
    measured = functools.reduce(DataFrame.unionByName, [p.select("modality", "article_id", "neighbour_id") for p in parts])
    cats = tables.read(spark, db, tables.ARTICLES).select("article_id", F.col(column).alias("_cat"))
    pairs = (measured.join(common.withColumn("_common", F.lit(True)), "article_id", "left")
             .join(cats, "article_id", "left")
             .join(cats.select(F.col("article_id").alias("neighbour_id"), F.col("_cat").alias("_n_cat")),
                   "neighbour_id", "left")
             .withColumn("_same", (F.col("_cat") == F.col("_n_cat")).cast("double")))
    rows = pairs.groupBy("modality").agg(
        F.avg("_same").alias("precision"),
        F.avg(F.when(F.col("_common").isNotNull(), F.col("_same"))).alias("precision_common"),
    ).collect()
    got = {r["modality"]: r for r in rows}

    def rounded(value: Any) -> float:
        return round(float(value), 4) if value is not None else float("nan")

    return {m: {"articles": int(sizes[m]["articles"]) if m in sizes else 0,
                "rows": int(sizes[m]["rows"]) if m in sizes else 0,
                "measured_on": "all lists" if m in whole else "rewritten lists",
                "category_precision_at_k": rounded(got[m]["precision"] if m in got else None),
                "category_precision_common_at_k": rounded(got[m]["precision_common"] if m in got else None)}
            for m in modalities}


def fits_driver(spark: SparkSession, limit_mb: int, articles: int, dim: int) -> bool:
    """Whether an update of ``articles`` vectors of ``dim`` float32 runs on the driver: their
    bytes at most ``limit_mb`` MiB (``knn.driver_update_mb``) and 3/4 of
    ``spark.driver.maxResultSize`` (0: no limit), which the collected vectors count against."""
    need = articles * dim * 4
    size = spark.conf.get("spark.driver.maxResultSize", "1g") or "1g"
    jvm = spark.sparkContext._jvm
    assert jvm is not None
    most = int(jvm.org.apache.spark.network.util.JavaUtils.byteStringAsBytes(size))
    return need <= limit_mb << 20 and (most == 0 or need <= most * 3 // 4)


def _neighbours_of(
    spark: SparkSession, cfg: Config, run_id: str, modality: str, vectors: DataFrame, common: DataFrame,
    model_ids: dict[str, str], previous: state.Consumed | None, changes: Changes | None,
) -> tuple[dict[str, Any], Written | None]:
    """One modality of :func:`run`: its new lists (not yet written) and its figures."""
    db = cfg.data.database
    params = LSHParams(**cfg.knn.lsh.model_dump())
    started = time.perf_counter()
    segments = load_layout(spark, db, model_ids["fused"]).segments if modality == "fused" else ()
    how = plan(spark, cfg, modality, model_ids[modality], previous, segments, changes)
    logger.info("neighbours %s: %s (%s)", modality, how.mode, how.reason)
    knn = cfg.knn
    if how.mode == "full":  # fit, search, probe and recall each read the vectors: cache them once
        vectors.persist()
    entry: dict[str, Any] = {"mode": how.mode, "reason": how.reason, "changed": how.n_changed,
                             "removed": how.n_removed}
    if how.mode != "update":  # an update reads them once (into its own prepared copy) and counts them there
        entry["vectors"] = vectors.count()
    if how.mode == "unchanged":
        entry["seconds"] = round(time.perf_counter() - started, 2)
        return entry, None
    replaced: DataFrame | None = None  # update: the superseded lists (article_id)
    if how.mode == "update":
        assert how.saved is not None and how.changed is not None and how.previous is not None
        bound = how.saved.bucket_bound(how.n_changed)
        entry["on_driver"] = fits_driver(spark, knn.driver_update_mb, how.saved.articles + how.n_changed,
                                         how.saved.index.dim)
        update = update_top_k(vectors, how.previous, how.changed, knn.k, how.saved.index, segments,
                              knn.block_size, knn.exact_block_rows, bucket_bound=bound, on_driver=entry["on_driver"])
        result, index_id = update.lists, how.saved.index_id
        entry["vectors"] = update.articles
        if not update.full:
            replaced = update.replaced
        entry["reason"] = (f"{how.reason}; {update.affected} lists searched again, {update.touched} entered by a "
                           "changed vector" + ("; full search (cheaper)" if update.full else ""))
        if update.largest_bucket is not None:
            entry["largest_bucket"] = update.largest_bucket
        else:  # not measured: the bound showed no bucket can be too large
            entry["largest_bucket_bound"] = bound
    elif knn.backend == "lsh" and how.saved is not None:  # knn.recompute
        index_id = how.saved.index_id
        result = top_k(vectors, knn.k, "lsh", segments=segments, block_size=knn.block_size,
                       block_rows=knn.exact_block_rows, index=how.saved.index)
    elif knn.backend == "lsh":
        index = fit_index(vectors, params)
        with _SAVE_INDEX:
            index_id = save_index(spark, db, modality, index, model_ids[modality], entry["vectors"], run_id)
        result = top_k(vectors, knn.k, "lsh", segments=segments, block_size=knn.block_size,
                       block_rows=knn.exact_block_rows, index=index)
    else:
        index_id = ""
        result = top_k(vectors, knn.k, knn.backend, params, segments, knn.block_size, knn.exact_block_rows,
                       MLlibParams(**knn.mllib.model_dump()))
    entry["index_id"] = index_id
    names = F.array(*[F.lit(s[0]) for s in segments]) if segments else None
    scores = (
        F.map_filter(F.map_from_arrays(names, F.col("segment_scores")), lambda _k, v: ~F.isnan(v))  # type: ignore[arg-type]
        if segments
        else F.lit(None).cast("map<string,float>")
    )
    rows = result.select(
        "article_id",
        F.lit(modality).alias("modality"),
        "rank",
        "neighbour_id",
        "score",
        scores.alias("modality_scores"),
        F.lit(run_id).alias("run_id"),
    )
    if how.mode == "full":  # the probe fits a classifier: a property of the vectors, measured when refitted
        entry.update(linear_probe(spark, cfg, vectors.join(common, "article_id", "left_semi")))
    # recall measures the index: with a full search (an update equals a full search with the same index)
    if cfg.knn.recall_sample and cfg.knn.backend != "exact" and replaced is None:
        t0 = time.perf_counter()
        r = recall_at_k(vectors, result, cfg.knn.k, cfg.knn.recall_sample)
        entry["recall_at_k"] = round(r["recall"], 4)
        entry["recall_queries"] = int(r["queries"])
        entry["recall_seconds"] = round(time.perf_counter() - t0, 2)
    entry["seconds"] = round(time.perf_counter() - started, 2)
    logger.info("neighbours %s: %s in %.1f s, recall@%d %s, probe macro-F1 %s", modality, how.mode, entry["seconds"],
                cfg.knn.k, entry.get("recall_at_k", "n/a"), entry.get("probe_macro_f1", "n/a"))
    return entry, Written(modality, rows, replaced)
