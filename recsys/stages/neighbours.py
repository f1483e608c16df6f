"""Neighbours stage: top-K per modality into ``item_neighbours`` (:mod:`recsys.knn`), with quality figures."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
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
from recsys.knn.index import SavedIndex, load_index, save_index

logger = logging.getLogger(__name__)

STAGE = "neighbours"


def category_precision(spark: SparkSession, cfg: Config, neighbours: DataFrame, column: str = "category_l3") -> float:
    """Share of (article, neighbour) pairs whose ``column`` (default: product type) is equal."""
    cats = tables.read(spark, cfg.data.database, tables.ARTICLES).select("article_id", column)
    joined = neighbours.join(cats, "article_id").join(
        cats.select(F.col("article_id").alias("neighbour_id"), F.col(column).alias("n_cat")), "neighbour_id"
    )
    value = tables.first_row(joined.agg(F.avg((F.col(column) == F.col("n_cat")).cast("double"))))[0]
    return float(value) if value is not None else float("nan")


def run(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Top-K neighbours for each configured modality (``cfg.knn.modalities``).

    Writes ``item_neighbours`` (one MERGE per modality: the modality's rows become the new lists,
    only rows that differ are written). For the fused
    vectors, each pair also carries the cosine in every modality (``modality_scores``).

    Quality per modality: category precision@K over all its articles and over the articles that
    have every modality (``common``, where modalities compare like for like), and a linear probe
    (:func:`recsys.evaluation.probe.linear_probe`) on the common articles. An update measures
    category precision on the lists it rewrote (``measured_on``) and no recall or probe (the
    index and the vectors' model are those the full run measured).

    A daily refresh (``lsh``): the index fitted on a full run is saved (``lsh_index``) and the
    versions of ``item_embeddings`` and ``articles`` it read are recorded (``stage_state``). The
    next run compares each modality's vectors with those versions (:func:`plan`): none changed,
    nothing is searched or written; a few changed (at most ``knn.refit_share``), only the lists
    they alter are rewritten with the saved index (:func:`recsys.knn.update_top_k`, equal to a
    full recompute with that index; one MERGE writes those lists and deletes the rows they
    supersede); otherwise, or when the model, the settings or
    the index's age (``knn.refit_days``) call for it, the index is refitted and every list
    recomputed.

    Returns:
        Per modality: ``mode`` (full, update, unchanged) and its ``reason``, ``changed`` and
        ``removed`` vectors, ``index_id``, ``articles``, ``rows``, ``seconds``, ``recall_at_k``
        (LSH against exact on ``cfg.knn.recall_sample`` queries), ``category_precision_at_k``,
        ``category_precision_common_at_k``, ``probe_macro_f1``, ``probe_accuracy`` (full mode only);
        and
        ``common_articles``.
    """
    db = cfg.data.database
    versions = {"item_embeddings": state.table_version(spark, db, tables.ITEM_EMBEDDINGS),
                "articles": state.table_version(spark, db, tables.ARTICLES)}
    settings = {"knn": state.fingerprint(cfg.knn)}
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
    try:
        report["common_articles"] = common.count()
        for modality in cfg.knn.modalities:
            if modality not in model_ids:
                logger.info("neighbours %s: no vectors (modality off or not embedded), skipped", modality)
                continue
            vectors = current_vectors(spark, cfg, {modality: model_ids[modality]}).select("article_id", "vector").persist()
            try:
                report[modality] = _neighbours_of(spark, cfg, run_id, modality, vectors, common, model_ids, previous)
            finally:
                vectors.unpersist()
    finally:
        common.unpersist()
    state.record(spark, db, STAGE, run_id, versions, settings)
    return report


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
    spark: SparkSession, cfg: Config, modality: str, model_id: str, vectors: DataFrame, n: int,
    previous: state.Consumed | None, segments: Segments,
) -> Plan:
    """Decide how to bring ``modality``'s lists up to date (see :class:`Plan` and ``knn.refit_*``).

    The vectors that changed are the difference between ``item_embeddings`` and ``articles`` at
    the versions the last run consumed and now: new or changed vectors (article_id and
    ``content_hash`` compared: a vector is a function of its model and content hash) and removed
    articles. With ``knn.recompute`` a usable saved index is kept but every
    list is searched again (``full`` with ``saved``): what an update must equal.
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
    assert previous is not None
    old_embeddings = state.as_of(spark, db, tables.ITEM_EMBEDDINGS, previous.versions["item_embeddings"])
    old_articles = state.as_of(spark, db, tables.ARTICLES, previous.versions["articles"])
    if old_embeddings is None or old_articles is None:
        return Plan("full", "the versions the last run read are no longer readable")
    # a vector is a function of its model and content_hash (every writer of item_embeddings
    # keeps that true), so the hashes tell what changed without reading a vector
    def hashes(embeddings: DataFrame, articles: DataFrame) -> DataFrame:
        return (embeddings.where((F.col("modality") == modality) & (F.col("model_id") == model_id))
                .join(articles.select("article_id"), "article_id", "left_semi")
                .select("article_id", F.coalesce("content_hash", F.lit("")).alias("content_hash")))

    old = hashes(old_embeddings, old_articles)
    now = hashes(tables.read(spark, db, tables.ITEM_EMBEDDINGS), tables.read(spark, db, tables.ARTICLES))
    changed = now.join(old, ["article_id", "content_hash"], "left_anti").select("article_id").persist()
    n_changed = changed.count()
    n_removed = old.select("article_id").join(now, "article_id", "left_anti").count()
    lists = tables.read(spark, db, tables.ITEM_NEIGHBOURS).where(F.col("modality") == modality)
    if lists.limit(1).count() == 0:
        changed.unpersist()
        return Plan("full", "no previous lists")
    if n_changed == 0 and n_removed == 0:
        changed.unpersist()
        return Plan("unchanged", "no vector changed since the last run")
    share = (n_changed + n_removed) / max(1, n)
    if share > cfg.knn.refit_share:
        changed.unpersist()
        return Plan("full", f"{share:.1%} of the vectors changed (knn.refit_share {cfg.knn.refit_share:.0%})",
                    n_changed=n_changed, n_removed=n_removed)
    nan = F.lit(float("nan")).cast("float")
    segment_scores = (
        [F.array(*[F.coalesce(F.col("modality_scores")[m], nan) for m, _, _ in segments]).alias("segment_scores")]
        if segments else []
    )
    previous_lists = lists.select("article_id", "rank", "neighbour_id", "score", *segment_scores)
    return Plan("update", f"{n_changed} new or changed and {n_removed} removed vectors", saved, changed,
                previous_lists, n_changed, n_removed)


def _neighbours_of(
    spark: SparkSession, cfg: Config, run_id: str, modality: str, vectors: DataFrame, common: DataFrame,
    model_ids: dict[str, str], previous: state.Consumed | None,
) -> dict[str, Any]:
    """One modality of :func:`run`: its lists into ``item_neighbours`` and its figures."""
    db = cfg.data.database
    params = LSHParams(**cfg.knn.lsh.model_dump())
    started = time.perf_counter()
    segments = load_layout(spark, db, model_ids["fused"]).segments if modality == "fused" else ()
    n_vectors = vectors.count()
    how = plan(spark, cfg, modality, model_ids[modality], vectors, n_vectors, previous, segments)
    logger.info("neighbours %s: %s (%s)", modality, how.mode, how.reason)
    knn = cfg.knn
    deleted: DataFrame | None = None  # update: the superseded rows, deleted in the MERGE
    measured = "all lists"
    try:
        if how.mode == "unchanged":
            return {"vectors": n_vectors, "mode": how.mode, "reason": how.reason, "changed": 0, "removed": 0,
                    "seconds": round(time.perf_counter() - started, 2)}
        if how.mode == "update":
            assert how.saved is not None and how.changed is not None and how.previous is not None
            update = update_top_k(vectors, how.previous, how.changed, knn.k, how.saved.index, segments,
                                  knn.block_size, knn.exact_block_rows)
            result, index_id = update.lists, how.saved.index_id
            if not update.full:
                deleted = how.previous.join(update.replaced, "article_id", "left_semi").select(
                    "article_id", F.lit(modality).alias("modality"), "rank")
                measured = "rewritten lists"
            how = dataclasses.replace(how, reason=f"{how.reason}; {update.affected} lists searched again, "
                                      f"{update.touched} entered by a changed vector"
                                      + ("; full search (cheaper)" if update.full else ""))
        elif knn.backend == "lsh" and how.saved is not None:  # knn.recompute
            index_id = how.saved.index_id
            result = top_k(vectors, knn.k, "lsh", segments=segments, block_size=knn.block_size,
                           block_rows=knn.exact_block_rows, index=how.saved.index)
        elif knn.backend == "lsh":
            index = fit_index(vectors, params)
            index_id = save_index(spark, db, modality, index, model_ids[modality], n_vectors, run_id)
            result = top_k(vectors, knn.k, "lsh", segments=segments, block_size=knn.block_size,
                           block_rows=knn.exact_block_rows, index=index)
        else:
            index_id = ""
            result = top_k(vectors, knn.k, knn.backend, params, segments, knn.block_size, knn.exact_block_rows,
                           MLlibParams(**knn.mllib.model_dump()))
    finally:
        if how.changed is not None:
            how.changed.unpersist()
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
    # one commit; only the rows that differ are written. An update brings the rewritten lists
    # and the keys of the rows they supersede; a full search the whole slice.
    if deleted is not None:
        tables.merge(spark, db, tables.ITEM_NEIGHBOURS, rows, only_changed=True, deleted=deleted)
    else:
        tables.merge(spark, db, tables.ITEM_NEIGHBOURS, rows, only_changed=True,
                     delete_missing=f"t.modality = '{modality}'")
    seconds = time.perf_counter() - started
    written = tables.read(spark, db, tables.ITEM_NEIGHBOURS).where(F.col("modality") == modality)
    counts = tables.first_row(written.agg(F.count(F.lit(1)).alias("rows"), F.countDistinct("article_id").alias("articles")))
    # an update measures the lists it rewrote (the others were measured when written)
    checked = written.join(result.select("article_id").distinct(), "article_id", "left_semi") if deleted is not None \
        else written
    entry: dict[str, Any] = {
        "vectors": n_vectors,
        "mode": how.mode,
        "reason": how.reason,
        "changed": how.n_changed,
        "removed": how.n_removed,
        "index_id": index_id,
        "articles": int(counts["articles"]),
        "rows": int(counts["rows"]),
        "seconds": round(seconds, 2),
        "measured_on": measured,
        "category_precision_at_k": round(category_precision(spark, cfg, checked), 4),
        "category_precision_common_at_k": round(
            category_precision(spark, cfg, checked.join(common, "article_id", "left_semi")), 4
        ),
    }
    if how.mode == "full":  # the probe fits a classifier: a property of the vectors, measured when refitted
        entry.update(linear_probe(spark, cfg, vectors.join(common, "article_id", "left_semi")))
    # recall measures the index: with a full search (an update equals a full search with the same index)
    if cfg.knn.recall_sample and cfg.knn.backend != "exact" and deleted is None:
        t0 = time.perf_counter()
        r = recall_at_k(vectors, written, cfg.knn.k, cfg.knn.recall_sample)
        entry["recall_at_k"] = round(r["recall"], 4)
        entry["recall_queries"] = int(r["queries"])
        entry["recall_seconds"] = round(time.perf_counter() - t0, 2)
    logger.info(
        "neighbours %s: %d articles, %d rows, %.1f s, recall@%d %s, category precision@%d %.3f "
        "(common articles %.3f), probe macro-F1 %s",
        modality, entry["articles"], entry["rows"], seconds, cfg.knn.k, entry.get("recall_at_k", "n/a"),
        cfg.knn.k, entry["category_precision_at_k"], entry["category_precision_common_at_k"],
        entry.get("probe_macro_f1", "n/a"),
    )
    return entry
