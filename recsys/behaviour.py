"""Behaviour modality: item vectors learned from purchases (Spark ML implicit ALS item factors).

Implicit-feedback ALS (Hu, Koren & Volinsky 2008, "Collaborative Filtering for Implicit Feedback
Datasets"; Spark's ``pyspark.ml.recommendation.ALS`` with ``implicitPrefs=True``) factorises the
customer × article purchase-count matrix with confidence ``1 + alpha × purchases``. Each article's
item factor, L2-normalised, is its behaviour vector: articles bought by the same customers point the
same way. Only articles bought at least ``behaviour.min_purchases`` times get one; the rest rely on
their content modalities (cold start), and fusion re-normalises over what an article has.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from pyspark.ml.recommendation import ALS
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType

from recsys.config import BehaviourConfig

logger = logging.getLogger(__name__)


def _dense_ids(df: DataFrame, column: str, id_column: str) -> DataFrame:
    """``(column, id_column int)``: 0..n-1 in ``column`` order (zipWithIndex: distributed, deterministic)."""
    distinct = df.select(column).distinct().orderBy(column)
    schema = StructType([StructField(column, StringType(), False), StructField(id_column, LongType(), False)])
    indexed = distinct.rdd.zipWithIndex().map(lambda pair: (pair[0][0], pair[1]))
    return df.sparkSession.createDataFrame(indexed, schema).withColumn(id_column, F.col(id_column).cast("int"))


def als_item_vectors(transactions: DataFrame, params: BehaviourConfig) -> DataFrame:
    """Behaviour vectors from purchases.

    Args:
        transactions: ``(customer_id string, article_id string, ...)``, one row per unit bought.
        params: ALS rank, iterations, regularisation, alpha, seed and ``min_purchases``.

    Returns:
        ``(article_id string, vector array<float> of length rank, L2-normalised, dim int,
        purchases long)`` for articles bought at least ``min_purchases`` times whose factor is
        not zero, persisted (the caller unpersists). Empty when ``transactions`` is.

    Source: Hu, Koren & Volinsky 2008 (implicit ALS); Spark ML ``ALS``.
    """
    counts = (
        transactions.groupBy("customer_id", "article_id")
        .agg(F.count(F.lit(1)).cast("float").alias("purchases"))
        .persist()
    )
    users = _dense_ids(counts, "customer_id", "user")
    items = _dense_ids(counts, "article_id", "item")
    blocks = min(10, transactions.sparkSession.sparkContext.defaultParallelism)
    ratings = counts.join(users, "customer_id").join(items, "article_id").select("user", "item", "purchases").persist()
    als = ALS(
        rank=params.rank, maxIter=params.max_iter, regParam=params.reg_param, alpha=params.alpha,
        implicitPrefs=True, userCol="user", itemCol="item", ratingCol="purchases", seed=params.seed,
        coldStartStrategy="drop", nonnegative=False,
        # one block per core: ALS's default of 10 blocks is mostly task overhead on small data
        numUserBlocks=max(1, blocks), numItemBlocks=max(1, blocks),
    )
    model = als.fit(ratings)
    totals = counts.groupBy("article_id").agg(F.sum("purchases").cast("long").alias("purchases"))
    norm = F.sqrt(F.aggregate("features", F.lit(0.0).cast("double"), lambda acc, x: acc + x * x))
    vectors = (
        model.itemFactors.withColumnRenamed("id", "item")
        .join(items, "item")
        .join(totals, "article_id")
        .where(F.col("purchases") >= params.min_purchases)
        .withColumn("norm", norm)
        .where(F.col("norm") > 0)
        .select(
            "article_id",
            # coalesce: division is nullable, the table's vector elements are not (never taken: norm > 0)
            F.transform("features", lambda x: F.coalesce((x / F.col("norm")).cast("float"), F.lit(0.0).cast("float")))
            .alias("vector"),
            F.size("features").alias("dim"),
            "purchases",
        )
    )
    vectors = vectors.persist()
    vectors.count()
    ratings.unpersist()
    counts.unpersist()
    return vectors


def behaviour_model_id(params: BehaviourConfig, transactions: int, last_date: Any) -> str:
    """``als@<12 hex>`` of the ALS settings and the purchases it was trained on (count, last date)."""
    recipe = json.dumps({**params.model_dump(), "transactions": transactions, "last_date": str(last_date)}, sort_keys=True)
    return "als@" + hashlib.sha256(recipe.encode()).hexdigest()[:12]


