"""The linear probe against scikit-learn on the same split, and its split against the image encoder's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from recsys import tables
from recsys.evaluation.probe import linear_probe
from recsys.training import holdout_column
from tests.conftest import test_config, write_table

pytestmark = pytest.mark.spark


def test_linear_probe_equals_scikit_learn_on_groups_the_encoder_held_out(spark, warehouse: Path) -> None:  # type: ignore[no-untyped-def]
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    db = "quality_probe"
    # seed 7, not the probe's old fixed 42: a probe that ignored train.seed would score other groups
    cfg = test_config(warehouse, db, "train.seed=7", "train.holdout=0.4", "quality.holdout=0.3",
                      "quality.probe_max_iter=300")
    tables.ensure_tables(spark, db)
    rng = np.random.default_rng(3)
    n, dim, classes = 900, 8, ("dress", "shoe", "top")
    label = rng.integers(0, 3, n)
    centres = rng.normal(size=(3, dim)) * 1.2
    x = (centres[label] + rng.normal(size=(n, dim))).astype(np.float32)  # overlapping classes: F1 well below 1
    ids = [f"{i:010d}" for i in range(n)]
    groups = [f"g{i // 3:04d}" for i in range(n)]  # three variants per product group
    write_table(spark, db, tables.ARTICLES, spark.createDataFrame(
        [(a, g, classes[c]) for a, g, c in zip(ids, groups, label)], "article_id string, product_group_id string, category_l2 string"))
    vectors = spark.createDataFrame([(a, v.tolist()) for a, v in zip(ids, x)], "article_id string, vector array<float>")

    got = linear_probe(spark, cfg, vectors)  # type: ignore[arg-type]

    split = {r["g"]: (r["probe"], r["encoder"]) for r in spark.createDataFrame([(g,) for g in set(groups)], "g string").select(
        "g", holdout_column(F.col("g"), 7, 0.3).alias("probe"), holdout_column(F.col("g"), 7, 0.4).alias("encoder")).collect()}
    assert all(encoder for probe, encoder in split.values() if probe)  # probe test groups ⊆ groups the encoder held out
    test = np.array([split[g][0] for g in groups])
    assert got["probe_holdout_articles"] == int(test.sum()) > 100
    assert got["probe_classes"] == 3
    # the same objective in scikit-learn: mean log-loss + regParam/2 ||w||^2 (Spark) = C = 1 / (n_train regParam)
    reference = LogisticRegression(C=1.0 / (int((~test).sum()) * 1e-4), max_iter=5000).fit(x[~test], label[~test])
    predicted = reference.predict(x[test])
    macro = f1_score(label[test], predicted, average="macro")
    assert 0.5 < macro < 0.95  # a probe with something to get wrong
    assert got["probe_macro_f1"] == pytest.approx(macro, abs=0.02)
    assert got["probe_accuracy"] == pytest.approx(accuracy_score(label[test], predicted), abs=0.02)
