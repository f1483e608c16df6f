"""Quality of a vector space per modality: a linear probe (Spark ML logistic regression).

A linear probe trains a linear classifier on frozen embeddings and scores it on held-out items
(Alain & Bengio 2016, "Understanding intermediate layers using linear classifier probes"): how
much of the category a modality's vectors carry, linearly. Here the classifier is Spark ML's
multinomial ``LogisticRegression`` on ``quality.label``, trained on the product groups outside a
``quality.holdout`` share and scored by macro-F1 and accuracy on the rest. The held-out groups
come from the same hash and seed as the image encoder's held-out split
(:func:`recsys.training.holdout_column`; the config keeps ``quality.holdout <= train.holdout``),
so the image and fused probes are never scored on articles the encoder was trained on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.feature import StringIndexer
from pyspark.ml.functions import array_to_vector
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys import tables
from recsys.config import Config
from recsys.training import holdout_column, macro_f1

logger = logging.getLogger(__name__)


def linear_probe(spark: SparkSession, cfg: Config, vectors: DataFrame, seed: int = 42) -> dict[str, Any]:
    """Macro-F1 and accuracy of a logistic regression from ``vectors`` to ``cfg.quality.label``.

    Args:
        vectors: ``(article_id, vector array<float>)``, one row per article.
        seed: orders the deterministic sample of ``quality.probe_max_articles`` articles.

    Returns:
        ``{probe_macro_f1, probe_accuracy, probe_holdout_articles, probe_classes, probe_seconds}``;
        ``{}`` when the probe is off (``quality.probe_max_iter: 0``) or there are fewer than two
        labelled classes or no held-out articles.
    """
    q = cfg.quality
    if q.probe_max_iter == 0:
        return {}
    started = time.perf_counter()
    labels = tables.read(spark, cfg.data.database, tables.ARTICLES).select(
        "article_id", F.col(q.label).alias("label"), F.coalesce("product_group_id", "article_id").alias("group")
    )
    data = (
        vectors.join(labels, "article_id")
        .where(F.col("label").isNotNull())
        .withColumn("order", F.xxhash64("article_id", F.lit(seed)))
        .orderBy("order", "article_id")
        .limit(q.probe_max_articles)
        .select(
            "article_id",
            "label",
            array_to_vector(F.col("vector")).alias("features"),
            holdout_column(F.col("group"), cfg.train.seed, q.holdout).alias("holdout"),
        )
        .persist()
    )
    train, test = data.where(~F.col("holdout")), data.where(F.col("holdout"))
    n_classes = train.select("label").distinct().count()
    n_test = test.count()
    if n_classes < 2 or n_test == 0:
        data.unpersist()
        return {}
    indexer = StringIndexer(inputCol="label", outputCol="y", handleInvalid="keep", stringOrderType="alphabetAsc").fit(train)
    model = LogisticRegression(
        featuresCol="features", labelCol="y", maxIter=q.probe_max_iter, regParam=1e-4, family="multinomial"
    ).fit(indexer.transform(train))
    scored = model.transform(indexer.transform(test)).select("y", "prediction").collect()
    data.unpersist()
    truth = np.array([r["y"] for r in scored], dtype=np.int64)
    predicted = np.array([r["prediction"] for r in scored], dtype=np.int64)
    f1, _ = macro_f1(truth, predicted)
    return {
        "probe_macro_f1": round(f1, 4),
        "probe_accuracy": round(float(np.mean(truth == predicted)), 4),
        "probe_holdout_articles": int(n_test),
        "probe_classes": int(n_classes),
        "probe_seconds": round(time.perf_counter() - started, 2),
    }
