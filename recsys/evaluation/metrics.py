"""Evaluation metrics and the time split (no I/O: DataFrames in, figures out).

Definitions (MAP@K as the H&M competition defines it, recall@K, NDCG@K, coverage, category
precision@K, co-purchase hit rate@K) are given in :mod:`recsys.stages.evaluate`.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from recsys import tables


def average_precision_at_k(actual: Iterable[str], predicted: Sequence[str], k: int = 12) -> float:
    """AP@K of one customer, exactly as the H&M competition scores it (module docstring).

    Args:
        actual: the articles bought in the validation week (duplicates count once).
        predicted: the ranked predictions; only the first ``k`` count, and a repeated article
            counts only at its first rank.
        k: the cut-off.

    Returns:
        AP@K in [0, 1]; 0.0 when nothing was bought (such customers are left out of MAP@K).
    """
    truth = set(actual)
    if not truth:
        return 0.0
    hits, score, seen = 0, 0.0, set()
    for i, p in enumerate(predicted[:k]):
        if p in truth and p not in seen:
            hits += 1
            score += hits / (i + 1.0)
        seen.add(p)
    return score / min(len(truth), k)


@dataclass(frozen=True)
class Split:
    """A time split: ``train`` before ``first_validation_day``, ``validation`` from it on."""

    train: DataFrame
    validation: DataFrame
    first_validation_day: dt.date
    last_day: dt.date


def time_split(transactions: DataFrame, validation_days: int) -> Split:
    """The last ``validation_days`` dates (``last - validation_days + 1 .. last``) against the rest.

    Args:
        transactions: ``(t_dat date, customer_id, article_id, ...)``, not empty.

    Raises:
        ValueError: ``transactions`` is empty.
    """
    last = transactions.agg(F.max("t_dat")).first()
    if last is None or last[0] is None:
        raise ValueError("evaluate: no transactions to split")
    last_day: dt.date = last[0]
    first = last_day - dt.timedelta(days=validation_days - 1)
    cut = F.lit(first.isoformat()).cast("date")
    return Split(transactions.where(F.col("t_dat") < cut), transactions.where(F.col("t_dat") >= cut), first, last_day)


def ranking_metrics(predictions: DataFrame, actual: DataFrame, k: int, catalogue_size: int) -> dict[str, float]:
    """MAP@K, recall@K, NDCG@K and coverage of customer lists (definitions: module docstring).

    Args:
        predictions: ``(customer_id, rank int >= 1, article_id)``; ranks above ``k`` are ignored.
        actual: ``(customer_id, article_id)``: validation purchases (duplicates count once).
        k: the cut-off.
        catalogue_size: articles in the catalogue (coverage's denominator).

    Returns:
        ``{map_at_k, recall_at_k, ndcg_at_k, coverage, customers}``; ``customers`` is the number
        with a validation purchase (the means' denominator). Metrics are 0 when it is 0.
    """
    truth = actual.select("customer_id", "article_id").distinct()
    sizes = truth.groupBy("customer_id").agg(F.count(F.lit(1)).alias("m"))
    first = (
        predictions.where(F.col("rank") <= k)
        .groupBy("customer_id", "article_id")
        .agg(F.min("rank").alias("rank"))
    )
    hits = first.join(truth, ["customer_id", "article_id"])
    cumulative = Window.partitionBy("customer_id").orderBy("rank").rowsBetween(Window.unboundedPreceding, 0)
    per_hit = hits.withColumn("hits_so_far", F.count(F.lit(1)).over(cumulative)).select(
        "customer_id",
        (F.col("hits_so_far") / F.col("rank")).alias("precision"),
        (F.lit(1.0) / F.log2(F.col("rank") + 1.0)).alias("gain"),
    )
    per_customer = (
        sizes.join(
            per_hit.groupBy("customer_id").agg(
                F.sum("precision").alias("p"), F.sum("gain").alias("dcg"), F.count(F.lit(1)).alias("h")
            ),
            "customer_id",
            "left",
        )
        .fillna(0.0, ["p", "dcg"])
        .fillna(0, ["h"])
    )
    idcg = F.aggregate(
        F.sequence(F.lit(1), F.least(F.col("m"), F.lit(k))), F.lit(0.0),
        lambda acc, i: acc + F.lit(1.0) / F.log2(i + 1.0),
    )
    row = tables.first_row(
        per_customer.agg(
            F.avg(F.col("p") / F.least(F.col("m"), F.lit(k))).alias("map"),
            F.avg(F.col("h") / F.col("m")).alias("recall"),
            F.avg(F.col("dcg") / idcg).alias("ndcg"),
            F.count(F.lit(1)).alias("customers"),
        )
    )
    recommended = predictions.where(F.col("rank") <= k).select("article_id").distinct().count()
    return {
        "map_at_k": float(row["map"] or 0.0),
        "recall_at_k": float(row["recall"] or 0.0),
        "ndcg_at_k": float(row["ndcg"] or 0.0),
        "coverage": recommended / catalogue_size if catalogue_size else 0.0,
        "customers": int(row["customers"]),
    }


def copurchase_pairs(transactions: DataFrame, days: int) -> DataFrame:
    """Ordered pairs ``(article_id, neighbour_id)`` of different articles one customer bought at
    most ``days`` apart, the second not before the first; one row per customer and pair."""
    a = transactions.select("customer_id", F.col("article_id"), F.col("t_dat").alias("t_a"))
    b = transactions.select("customer_id", F.col("article_id").alias("neighbour_id"), F.col("t_dat").alias("t_b"))
    return (
        a.join(b, "customer_id")
        .where(F.col("article_id") != F.col("neighbour_id"))
        .where((F.col("t_b") >= F.col("t_a")) & (F.datediff("t_b", "t_a") <= days))
        .select("customer_id", "article_id", "neighbour_id")
        .distinct()
    )


def item_metrics(lists: DataFrame, pairs: DataFrame, categories: DataFrame, k: int) -> dict[str, float]:
    """Category precision@K and co-purchase hit rate@K of item-to-item lists.

    Args:
        lists: ``(article_id, rank, neighbour_id)``.
        pairs: :func:`copurchase_pairs` (customer_id, article_id, neighbour_id).
        categories: ``(article_id, category)``: the product type.
        k: ranks above it are ignored.

    Returns:
        ``{category_precision_at_k, copurchase_hit_rate_at_k, articles}`` (NaN without pairs or lists).
    """
    top = lists.where(F.col("rank") <= k).select("article_id", "neighbour_id")
    cats = categories.select("article_id", F.col("category").alias("c"))
    precision = tables.first_row(
        top.join(cats, "article_id")
        .join(cats.select(F.col("article_id").alias("neighbour_id"), F.col("c").alias("nc")), "neighbour_id")
        .agg(F.avg((F.col("c") == F.col("nc")).cast("double")).alias("p"), F.countDistinct("article_id").alias("n"))
    )
    hit = tables.first_row(
        pairs.join(top.withColumn("hit", F.lit(1.0)), ["article_id", "neighbour_id"], "left")
        .agg(F.avg(F.coalesce(F.col("hit"), F.lit(0.0))).alias("rate"))
    )
    return {
        "category_precision_at_k": float(precision["p"]) if precision["p"] is not None else math.nan,
        "copurchase_hit_rate_at_k": float(hit["rate"]) if hit["rate"] is not None else math.nan,
        "articles": int(precision["n"] or 0),
    }


def bought_together_lists(transactions: DataFrame, days: int, k: int) -> DataFrame:
    """The "bought together" baseline's item lists: for each article, the ``k`` articles most
    often bought by the same customer at most ``days`` apart (either order).

    Returns:
        ``(article_id, rank, neighbour_id, score)``: ``score`` = customers who bought both,
        ties broken by neighbour_id.
    """
    a = transactions.select("customer_id", "article_id", F.col("t_dat").alias("t_a"))
    b = transactions.select("customer_id", F.col("article_id").alias("neighbour_id"), F.col("t_dat").alias("t_b"))
    counts = (
        a.join(b, "customer_id")
        .where((F.col("article_id") != F.col("neighbour_id")) & (F.abs(F.datediff("t_b", "t_a")) <= days))
        .groupBy("article_id", "neighbour_id")
        .agg(F.countDistinct("customer_id").cast("float").alias("score"))
    )
    order = Window.partitionBy("article_id").orderBy(F.col("score").desc(), "neighbour_id")
    return counts.withColumn("rank", F.row_number().over(order)).where(F.col("rank") <= k)
