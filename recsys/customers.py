"""Customer recommendations: K articles per customer, each with the reason it was chosen.

Candidates come from three sources and their scores add up per (customer, article):

- ``similar_to:<article_id>``: the customer's recent purchases (seeds), each weighted by
  ``decay = 0.5 ^ (age in days / half_life_days)`` summed over its purchases, spread through the
  item-to-item lists: ``similar_weight × Σ_seeds decay(seed) × cosine(seed, candidate)``; the reason
  names the seed that contributed most.
- ``repurchase``: the seeds themselves, ``repurchase_weight × decay(seed)`` (H&M customers often
  buy an article again, in another size or for someone else).
- ``popular``: the K most bought articles of the last ``popular_days`` (ties: more purchases
  overall, then article_id), ``popular_weight × (1 - (popularity rank - 1) / K)``, offered to every
  customer, so every customer (cold-start ones included) gets K.

The reason of a row is that of its largest part. Ranks are 1..K by score descending, then
article_id ascending.
"""

from __future__ import annotations

import datetime as dt
import logging

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from recsys import tables
from recsys.config import Config, CustomersConfig

logger = logging.getLogger(__name__)


def popular_articles(transactions: DataFrame, articles: DataFrame, k: int, days: int) -> DataFrame:
    """The ``k`` most bought articles of the last ``days`` days of ``transactions``.

    Args:
        transactions: ``(t_dat date, article_id, ...)``.
        articles: ``(article_id)``: the catalogue; fills up with unsold articles (by id) when
            fewer than ``k`` were bought, so the list has ``min(k, catalogue)`` rows.

    Returns:
        ``(article_id, popularity_rank int 1..k, recent long, total long)``.
    """
    last = transactions.agg(F.max("t_dat").alias("last"))
    recent = (
        transactions.crossJoin(F.broadcast(last))
        .where(F.col("t_dat") > F.date_sub(F.col("last"), days))
        .groupBy("article_id").agg(F.count(F.lit(1)).alias("recent"))
    )
    total = transactions.groupBy("article_id").agg(F.count(F.lit(1)).alias("total"))
    ranked = (
        articles.select("article_id").distinct()
        .join(recent, "article_id", "left").join(total, "article_id", "left")
        .fillna(0, ["recent", "total"])
        .orderBy(F.col("recent").desc(), F.col("total").desc(), F.col("article_id"))
        .limit(k)
    )
    order = Window.orderBy(F.col("recent").desc(), F.col("total").desc(), F.col("article_id"))
    return ranked.withColumn("popularity_rank", F.row_number().over(order))


def customer_top_k(
    transactions: DataFrame,
    item_lists: DataFrame,
    customers: DataFrame,
    articles: DataFrame,
    params: CustomersConfig,
    as_of: dt.date | None = None,
) -> DataFrame:
    """Top-``params.k`` articles per customer (the module docstring gives the scoring).

    Args:
        transactions: ``(t_dat date, customer_id, article_id)``: the purchases to recommend
            from (for evaluation: the training part only).
        item_lists: ``(article_id, neighbour_id, score float)``: item-to-item lists (cosine);
            may be empty (then only repurchase and popularity).
        customers: ``(customer_id)``: everyone who gets a list.
        articles: ``(article_id)``: the catalogue (popularity fill-up).
        params: K, history window, half-life and the weight of each source.
        as_of: the day the lists are for; default the day after the last purchase. Ages are
            counted in days from it (the last day's purchases are 1 day old).

    Returns:
        ``(customer_id, rank int 1..K, article_id, score float, reason string)``: K rows for
        every customer when the catalogue has at least K articles.
    """
    k = params.k
    if as_of is None:
        last = transactions.agg(F.max("t_dat")).first()
        last_date = last[0] if last is not None else None
        as_of = (last_date + dt.timedelta(days=1)) if last_date is not None else dt.date.today()
    as_of_col = F.lit(as_of.isoformat()).cast("date")
    age = F.datediff(as_of_col, F.col("t_dat")).cast("double")
    seeds = (
        transactions.where(F.col("t_dat") < as_of_col)
        .where(F.col("t_dat") >= F.date_sub(as_of_col, params.history_days))
        .groupBy("customer_id", "article_id")
        .agg(F.sum(F.pow(F.lit(0.5), age / F.lit(params.half_life_days))).alias("w"))
        .withColumn(
            "seed_rank",
            F.row_number().over(Window.partitionBy("customer_id").orderBy(F.col("w").desc(), "article_id")),
        )
        .where(F.col("seed_rank") <= params.max_seeds)
        .drop("seed_rank")
    )
    parts = []
    if params.similar_weight > 0:
        lists = item_lists.select(
            F.col("article_id").alias("seed_id"), F.col("neighbour_id").alias("article_id"), "score"
        )
        similar = (
            seeds.select("customer_id", F.col("article_id").alias("seed_id"), "w")
            .join(lists, "seed_id")
            .select(
                "customer_id", "article_id",
                (F.lit(params.similar_weight) * F.col("w") * F.col("score")).alias("part"),
                F.concat(F.lit("similar_to:"), F.col("seed_id")).alias("reason"),
            )
        )
        parts.append(similar)
    if params.repurchase_weight > 0:
        parts.append(
            seeds.select(
                "customer_id", "article_id", (F.lit(params.repurchase_weight) * F.col("w")).alias("part"),
                F.lit("repurchase").alias("reason"),
            )
        )
    popular = popular_articles(transactions.where(F.col("t_dat") < as_of_col), articles, k, params.popular_days)
    parts.append(
        customers.select("customer_id").distinct()
        .crossJoin(F.broadcast(popular.select("article_id", "popularity_rank")))
        .select(
            "customer_id", "article_id",
            (F.lit(params.popular_weight) * (1.0 - (F.col("popularity_rank") - 1) / F.lit(k))).alias("part"),
            F.lit("popular").alias("reason"),
        )
    )
    candidates = parts[0]
    for part in parts[1:]:
        candidates = candidates.unionByName(part)
    # the reason of the largest part (ties: the larger reason string, so the choice is deterministic)
    scored = (
        candidates.join(customers.select("customer_id").distinct(), "customer_id", "left_semi")
        .groupBy("customer_id", "article_id")
        .agg(F.sum("part").alias("score"), F.max_by("reason", F.struct("part", F.col("reason"))).alias("reason"))
    )
    order = Window.partitionBy("customer_id").orderBy(F.col("score").desc(), F.col("article_id"))
    return (
        scored.withColumn("rank", F.row_number().over(order))
        .where(F.col("rank") <= k)
        .select("customer_id", F.col("rank").cast("int"), "article_id", F.col("score").cast("float"), "reason")
    )


def export_submission(spark: SparkSession, cfg: Config, output: str) -> int:
    """Write ``customer_recommendations`` as the H&M competition's submission CSV.

    One line per customer, ``customer_id,prediction``, the prediction being the article ids in
    rank order separated by spaces; customers in id order. Rows stream to the driver one
    partition at a time (``toLocalIterator``), so the file can be larger than driver memory.

    Args:
        output: a local file path (its folder is created).

    Returns:
        The number of customers written.

    Raises:
        ValueError: ``customer_recommendations`` is empty (run the customers stage first).
    """
    import csv
    from pathlib import Path

    recs = tables.read(spark, cfg.data.database, tables.CUSTOMER_RECOMMENDATIONS)
    lines = (
        recs.groupBy("customer_id")
        .agg(F.array_sort(F.collect_list(F.struct("rank", "article_id"))).alias("ranked"))
        .select("customer_id", F.concat_ws(" ", F.col("ranked.article_id")).alias("prediction"))
        .orderBy("customer_id")
    )
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["customer_id", "prediction"])
        for row in lines.toLocalIterator():
            writer.writerow([row["customer_id"], row["prediction"]])
            written += 1
    if written == 0:
        path.unlink()
        raise ValueError(f"{cfg.data.database}.customer_recommendations is empty: run the customers stage first")
    logger.info("export-submission: %d customers to %s", written, path)
    return written
