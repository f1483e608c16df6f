"""Evaluate stage: a time split of ``transactions``, customer metrics against baselines, item-to-item
quality per modality (with leave-one-out of the fused vector), and the HTML report.

Split: the last ``evaluate.validation_days`` dates of the transactions are the validation week,
everything before is training. Everything the scored lists depend on (behaviour vectors, fused
vectors, item-to-item lists, popularity, co-purchase counts, customer lists) is rebuilt from the
training part only; content vectors (text, image, metadata) do not depend on purchases.

Customer metrics (over the customers who bought something in the validation week; every
customer in ``customers`` gets a list, and customers without validation purchases are left out
of the means, as in the competition):

- MAP@K as the H&M competition defines it (Kaggle, "H&M Personalized Fashion Recommendations",
  Evaluation): ``AP@K = 1/min(m, K) × Σ_{i=1..K} P(i) × rel(i)`` with m the number of distinct
  articles the customer bought, ``P(i)`` the precision of the first i predictions and ``rel(i)``
  1 when the i-th prediction was bought (a repeated prediction counts once, at its first rank);
  MAP@K is the mean of AP@K.
- recall@K: bought articles among the K predictions / distinct articles bought.
- NDCG@K with binary relevance (Järvelin & Kekäläinen 2002): ``Σ rel(i)/log2(i+1)`` over the
  ideal ``Σ_{i=1..min(m,K)} 1/log2(i+1)``.
- coverage: distinct recommended articles / articles in the catalogue.

Systems: ``recsys`` (fused lists, as served), ``popular`` (last-week popularity for everyone),
``bought_together`` (co-purchase counts as item lists, no repurchase), ``fused_without_<m>``
(leave-one-out, ``evaluate.leave_one_out``) and each single modality (``evaluate.each_modality``).

Item-to-item quality per list: category precision@K (share of neighbours with the article's
product type) and co-purchase hit rate@K: over ordered pairs (a, b) of different articles
bought by one customer in the validation week at most ``copurchase_days`` apart (b not before
a), the share where b is in a's list (an article without a list counts as a miss).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys import tables
from recsys.behaviour import als_item_vectors
from recsys.config import Config
from recsys.customers import customer_top_k
from recsys.evaluation.metrics import (
    Split,
    bought_together_lists,
    copurchase_pairs,
    item_metrics,
    ranking_metrics,
    time_split,
)
from recsys.fusion import current_model_ids, current_vectors, fuse_vectors, modality_dims, plan_layout
from recsys.knn import LSHParams, MLlibParams, top_k
from recsys.runlog import flatten_report

logger = logging.getLogger(__name__)

CONTENT_MODALITIES = ("text", "image", "metadata")


def evaluate_split(
    spark: SparkSession, cfg: Config, transactions: DataFrame, customers: DataFrame, articles: DataFrame,
) -> tuple[dict[str, Any], dict[str, DataFrame]]:
    """Score recsys, the baselines and every modality variant on a time split.

    Args:
        transactions: ``(t_dat, customer_id, article_id)``: all purchases.
        customers: ``(customer_id)``: who gets a list.
        articles: ``(article_id, category_l3)``: the catalogue.

    Returns:
        ``(report, predictions)``: ``report`` holds ``k``, ``split`` counts, ``ranking`` (per
        system: :func:`ranking_metrics`) and ``items`` (per list: :func:`item_metrics`);
        ``predictions`` maps each system to its customer lists (persisted; the caller unpersists).

    Raises:
        ValueError: no transactions, or no training or no validation purchases.
    """
    k = cfg.customers.k
    split = time_split(transactions, cfg.evaluate.validation_days)
    cached: list[DataFrame] = []
    predictions: dict[str, DataFrame] = {}

    def keep(df: DataFrame) -> DataFrame:
        cached.append(df.persist())
        return df

    try:
        report = _evaluate_split(spark, cfg, split, customers, articles, k, keep, predictions)
    except BaseException:
        for df in predictions.values():
            df.unpersist()
        raise
    finally:
        for df in cached:
            df.unpersist()
    return report, predictions


def _evaluate_split(
    spark: SparkSession, cfg: Config, split: Split, customers: DataFrame, articles: DataFrame, k: int,
    keep: Callable[[DataFrame], DataFrame], predictions: dict[str, DataFrame],
) -> dict[str, Any]:
    """The body of :func:`evaluate_split`: ``keep`` persists a frame until the split is scored;
    each system's customer lists go into ``predictions`` (persisted)."""
    train = keep(split.train)
    validation = keep(split.validation)
    n_train, n_valid = train.count(), validation.count()
    if n_train == 0 or n_valid == 0:
        raise ValueError(
            f"evaluate: the split at {split.first_validation_day} leaves {n_train} training and {n_valid} "
            "validation purchases; both need some"
        )
    as_of = split.first_validation_day
    catalogue = keep(articles.select("article_id").distinct())
    n_articles = catalogue.count()
    categories = articles.select("article_id", F.col("category_l3").alias("category"))
    pairs = keep(copurchase_pairs(validation, cfg.evaluate.copurchase_days))
    report: dict[str, Any] = {
        "k": k,
        "split": {
            "train_transactions": n_train,
            "validation_transactions": n_valid,
            "validation_customers": validation.select("customer_id").distinct().count(),
            "validation_articles": validation.select("article_id").distinct().count(),
            "customers": customers.select("customer_id").distinct().count(),
            "copurchase_pairs": pairs.count(),
            "first_validation_day": as_of.toordinal() - dt.date(1970, 1, 1).toordinal(),
        },
        "ranking": {},
        "items": {},
    }
    logger.info(
        "evaluate: training %d purchases before %s, validation %d purchases by %d customers to %s; %d co-purchase pairs",
        n_train, as_of, n_valid, report["split"]["validation_customers"], split.last_day,
        report["split"]["copurchase_pairs"],
    )

    def score_customers(name: str, lists: DataFrame, params: Any) -> None:
        started = time.perf_counter()
        recs = customer_top_k(train, lists, customers, catalogue, params, as_of=as_of).persist()
        predictions[name] = recs
        figures = ranking_metrics(recs, validation, k, n_articles)
        figures["seconds"] = round(time.perf_counter() - started, 2)
        report["ranking"][name] = figures
        logger.info("evaluate %s: MAP@%d %.4f, recall@%d %.4f, NDCG@%d %.4f, coverage %.4f", name, k,
                    figures["map_at_k"], k, figures["recall_at_k"], k, figures["ndcg_at_k"], figures["coverage"])

    # baselines
    empty = spark.createDataFrame([], "article_id string, neighbour_id string, score float")
    score_customers("popular", empty, cfg.customers.model_copy(update={"similar_weight": 0.0, "repurchase_weight": 0.0}))
    together = keep(bought_together_lists(train, cfg.evaluate.copurchase_days, k))
    report["items"]["bought_together"] = item_metrics(together, pairs, categories, k)
    score_customers("bought_together", together, cfg.customers.model_copy(update={"repurchase_weight": 0.0}))

    # vectors per modality: content from item_embeddings, behaviour from the training purchases
    model_ids = current_model_ids(spark, cfg)
    content = {m: model_ids[m] for m in CONTENT_MODALITIES if m in model_ids}
    vectors = current_vectors(spark, cfg, content).join(catalogue, "article_id", "left_semi")
    if cfg.behaviour.enabled:
        als = als_item_vectors(train, cfg.behaviour)  # persisted by als_item_vectors
        cached_als = keep(als)
        behaviour = cached_als.select("article_id", F.lit("behaviour").alias("modality"), "vector", "dim")
        vectors = vectors.unionByName(behaviour)
    vectors = keep(vectors)
    dims = modality_dims(vectors)
    present = sorted(dims)
    weights = {m: w for m, w in cfg.fusion.weights.items() if w > 0 and m in present}
    variants: dict[str, dict[str, float]] = {}
    if weights:
        variants["fused"] = weights
        if cfg.evaluate.leave_one_out and len(weights) > 1:
            for m in sorted(weights):
                variants[f"fused_without_{m}"] = {x: w for x, w in weights.items() if x != m}
    if cfg.evaluate.each_modality or not weights:
        for m in present:
            variants.setdefault(m, {m: 1.0})
    lsh = LSHParams(**cfg.knn.lsh.model_dump())
    mllib = MLlibParams(**cfg.knn.mllib.model_dump())
    for name, mix in variants.items():
        started = time.perf_counter()
        if len(mix) == 1 and name in present:
            space = vectors.where(F.col("modality") == name).select("article_id", "vector")
        else:
            layout = plan_layout(mix, {m: model_ids.get(m, f"{m}@evaluation-split") for m in mix}, dims)
            space = fuse_vectors(vectors, layout).select("article_id", "vector")
        lists = top_k(space, k, cfg.knn.backend, lsh, (), cfg.knn.block_size, cfg.knn.exact_block_rows, mllib)
        lists = lists.select("article_id", "rank", "neighbour_id", "score")
        report["items"][name] = item_metrics(lists, pairs, categories, k)
        report["items"][name]["seconds"] = round(time.perf_counter() - started, 2)
        logger.info("evaluate %s lists: category precision@%d %.4f, co-purchase hit rate@%d %.4f (%d articles)", name,
                    k, report["items"][name]["category_precision_at_k"], k,
                    report["items"][name]["copurchase_hit_rate_at_k"], report["items"][name]["articles"])
        score_customers("recsys" if name == "fused" else name, lists, cfg.customers)
    return report


def run(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Evaluate stage: :func:`evaluate_split` on ``transactions``, then the HTML report.

    Skips (and says so) when the stage is off or there are no transactions.

    Returns:
        The report of :func:`evaluate_split` plus ``report_path`` and ``seconds``; or ``{skipped}``.
    """
    if not cfg.evaluate.enabled:
        logger.info("evaluate: off (evaluate.enabled: false), skipped")
        return {"skipped": "evaluate.enabled is false"}
    db = cfg.data.database
    transactions = tables.read(spark, db, tables.TRANSACTIONS).select("t_dat", "customer_id", "article_id")
    if transactions.limit(1).count() == 0:
        logger.info("evaluate: no transactions, skipped (nothing to split into training and validation)")
        return {"skipped": "no transactions"}
    started = time.perf_counter()
    customers = tables.read(spark, db, tables.CUSTOMERS).select("customer_id")
    articles = tables.read(spark, db, tables.ARTICLES).select("article_id", "category_l3")
    report, predictions = evaluate_split(spark, cfg, transactions, customers, articles)
    for df in predictions.values():
        df.unpersist()
    from recsys.evaluation.report import write_report

    figures: dict[str, float] = {}
    flatten_report("evaluate", report, figures)
    path = write_report(spark, cfg, run_id, figures)
    report["report_path"] = str(path)
    report["seconds"] = round(time.perf_counter() - started, 2)
    logger.info("evaluate: report %s (%.1f s)", path, report["seconds"])
    return report
