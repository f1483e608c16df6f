"""Customer lists, the Spark metrics and the time split on a real Spark session."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from recsys import tables
from recsys.customers import customer_top_k
from recsys.evaluation.metrics import average_precision_at_k, item_metrics, ranking_metrics, time_split
from recsys.stages.evaluate import evaluate_split
from tests import reference as reference_lists
from tests.conftest import cache_is_empty, test_config, write_table

pytestmark = pytest.mark.spark

FILLER = [f"x{i:02d}" for i in range(20)]

# (customer, predictions in rank order, articles bought in the validation week)
CASES = [
    ("c1", ["a", "x00", "b", *FILLER[1:10]], ["a", "b", "b"]),  # hits at 1 and 3; "b" bought twice
    ("c2", ["x00", "x01", "c", *FILLER[2:11]], ["c"]),  # fewer than 12 relevant
    ("c3", FILLER[:12], ["d", "e"]),  # no hit
    ("c4", FILLER[:12], []),  # no purchase in the validation week: not scored
    ("c5", FILLER[:12], FILLER[:14]),  # 14 relevant, all 12 ranks hit: AP@12 divides by min(14, 12)
]


def test_ranking_metrics_match_hand_computed_values(spark) -> None:  # type: ignore[no-untyped-def]
    predictions = spark.createDataFrame(
        [(c, r + 1, a) for c, preds, _ in CASES for r, a in enumerate(preds)],
        "customer_id string, rank int, article_id string",
    )
    actual = spark.createDataFrame(
        [(c, a) for c, _, bought in CASES for a in bought], "customer_id string, article_id string"
    )
    got = ranking_metrics(predictions, actual, 12, catalogue_size=100)
    # by hand: AP = (1 + 2/3)/2, 1/3, 0 and 12/12 over the four customers who bought something
    assert got["customers"] == 4
    assert got["map_at_k"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3 + 0 + 1) / 4)
    reference = [average_precision_at_k(b, p) for _, p, b in CASES if b]
    assert got["map_at_k"] == pytest.approx(sum(reference) / len(reference))
    assert got["recall_at_k"] == pytest.approx((1 + 1 + 0 + 12 / 14) / 4)
    ideal_two = 1 + 1 / 1.584962500721156  # 1/log2(2) + 1/log2(3)
    assert got["ndcg_at_k"] == pytest.approx(((1 + 0.5) / ideal_two + 0.5 + 0 + 1) / 4)
    distinct = {a for _, preds, _ in CASES for a in preds[:12]}
    assert got["coverage"] == pytest.approx(len(distinct) / 100)


def test_item_metrics_match_hand_computed_values(spark) -> None:  # type: ignore[no-untyped-def]
    """Category precision@2 and co-purchase hit rate@2; rank 3 is past the cut-off."""
    lists = spark.createDataFrame(
        [("a", 1, "b"), ("a", 2, "c"), ("a", 3, "d"), ("b", 1, "a"), ("b", 2, "d")],
        "article_id string, rank int, neighbour_id string")
    categories = {"a": "X", "b": "X", "c": "Y", "d": "X"}
    pairs = [("u1", "a", "c"), ("u1", "a", "d"), ("u2", "b", "d"), ("u2", "c", "a")]
    got = item_metrics(lists, spark.createDataFrame(pairs, "customer_id string, article_id string, neighbour_id string"),
                       spark.createDataFrame(list(categories.items()), "article_id string, category string"), 2)
    # by hand: a-b, a-c, b-a, b-d -> 3 of 4 share a category; a->c and b->d hit, a->d (rank 3) and c->a miss
    assert got == {"category_precision_at_k": 0.75, "copurchase_hit_rate_at_k": 0.5, "articles": 2}
    assert (got["category_precision_at_k"], got["copurchase_hit_rate_at_k"]) == reference_lists.list_metrics(
        {"a": ["b", "c"], "b": ["a", "d"]}, categories, set(pairs))


def test_ranking_metrics_count_a_repeated_prediction_once(spark) -> None:  # type: ignore[no-untyped-def]
    predictions = spark.createDataFrame(
        [("c1", 1, "a"), ("c1", 2, "a"), ("c1", 3, "b")], "customer_id string, rank int, article_id string"
    )
    actual = spark.createDataFrame([("c1", "a"), ("c1", "b")], "customer_id string, article_id string")
    got = ranking_metrics(predictions, actual, 12, 10)
    assert got["map_at_k"] == pytest.approx(average_precision_at_k({"a", "b"}, ["a", "a", "b"]))
    assert got["map_at_k"] == pytest.approx((1 + 2 / 3) / 2)


def purchases(spark):  # type: ignore[no-untyped-def]
    """40 customers over 60 days; articles p00..p29; q00 only bought in the last week."""
    start = dt.date(2020, 7, 1)
    rows = []
    for c in range(40):
        for j in range(6):
            day = start + dt.timedelta(days=(c * 7 + j * 11) % 60)
            rows.append((day, f"cust{c:02d}", f"p{(c + j * 3) % 30:02d}"))
    rows.append((start + dt.timedelta(days=58), "cust00", "q00"))
    rows.append((start + dt.timedelta(days=59), "cust01", "q00"))
    return spark.createDataFrame(rows, "t_dat date, customer_id string, article_id string")


def test_time_split_has_no_leakage(spark) -> None:  # type: ignore[no-untyped-def]
    tx = purchases(spark)
    split = time_split(tx, 7)
    assert split.last_day == dt.date(2020, 8, 29)
    assert split.first_validation_day == dt.date(2020, 8, 23)
    train_max = split.train.agg(F.max("t_dat")).first()[0]
    valid_min = split.validation.agg(F.min("t_dat")).first()[0]
    assert train_max < split.first_validation_day <= valid_min
    assert {r["t_dat"] for r in split.validation.select("t_dat").distinct().collect()} <= {
        split.first_validation_day + dt.timedelta(days=i) for i in range(7)
    }
    assert split.train.count() + split.validation.count() == tx.count()


def test_every_customer_gets_k_with_a_reason(spark) -> None:  # type: ignore[no-untyped-def]
    tx = purchases(spark).where(F.col("customer_id") != "cust39")  # cust39 becomes cold-start
    customers = spark.createDataFrame([(f"cust{c:02d}",) for c in range(40)] + [("newcomer",)], "customer_id string")
    articles = spark.createDataFrame([(f"p{i:02d}",) for i in range(30)] + [("q00",)], "article_id string")
    lists = spark.createDataFrame(
        [(f"p{i:02d}", f"p{(i + d) % 30:02d}", 1.0 - d / 10) for i in range(30) for d in (1, 2, 3)],
        "article_id string, neighbour_id string, score float",
    )
    cfg = test_config(Path("/tmp"), "unused")
    recs = customer_top_k(tx, lists, customers, articles, cfg.customers).collect()  # type: ignore[attr-defined]
    by_customer: dict[str, list[tuple[int, str, str]]] = {}
    for r in recs:
        by_customer.setdefault(r["customer_id"], []).append((r["rank"], r["article_id"], r["reason"]))
    assert set(by_customer) == {f"cust{c:02d}" for c in range(40)} | {"newcomer"}
    for rows in by_customer.values():
        rows.sort()
        assert [r for r, _, _ in rows] == list(range(1, 13))
        assert len({a for _, a, _ in rows}) == 12
        assert all(re.fullmatch(r"similar_to:p\d\d|repurchase|popular", reason) for _, _, reason in rows)
    # a cold-start customer gets the popularity list, the same as a newcomer
    assert [a for _, a, _ in by_customer["cust39"]] == [a for _, a, _ in by_customer["newcomer"]]
    assert {reason for _, _, reason in by_customer["newcomer"]} == {"popular"}
    # a customer with history gets their purchases back and their neighbours, with the seed named
    bought = {r["article_id"] for r in tx.where("customer_id = 'cust05'").collect()}
    mine = by_customer["cust05"]
    assert any(reason == "repurchase" and a in bought for _, a, reason in mine)
    for _, a, reason in mine:
        if reason.startswith("similar_to:"):
            seed = reason.split(":", 1)[1]
            assert seed in bought
            assert lists.where((F.col("article_id") == seed) & (F.col("neighbour_id") == a)).count() == 1


def test_evaluation_lists_do_not_see_the_validation_week(spark, warehouse: Path) -> None:  # type: ignore[no-untyped-def]
    """Behaviour (ALS) and metadata vectors; the lists are rebuilt from the training weeks only,
    and the leave-one-out lists leave out exactly one modality."""
    db = "eval_leak"
    cfg = test_config(
        warehouse, db, "text.enabled=false", "image.enabled=false",
        "behaviour.min_purchases=1", "behaviour.max_iter=5", "evaluate.leave_one_out=true",
        # 30 articles: all pairs, without fitting an LSH index for every list (LSH: tests/spark/test_knn.py)
        "knn.backend=exact",
    )
    tables.ensure_tables(spark, db)  # type: ignore[attr-defined]
    # content vectors for p00..p29 (q00 has none): one-hot of the article number mod 5
    write_table(spark, db, tables.ITEM_EMBEDDINGS, spark.createDataFrame(
        [(f"p{i:02d}", "metadata", "meta-1", [1.0 if j == i % 5 else 0.0 for j in range(5)], 5, "h", "r0")
         for i in range(30)], tables.ITEM_EMBEDDINGS.schema))
    tx = purchases(spark)
    customers = tx.select("customer_id").distinct()
    articles = tx.select("article_id").distinct().withColumn("category_l3", F.substring("article_id", 1, 1))
    write_table(spark, db, tables.ARTICLES, articles)  # the current catalogue, whose vectors count
    spark.catalog.clearCache()
    report, predictions = evaluate_split(spark, cfg, tx, customers, articles)  # type: ignore[arg-type]
    first = {name: sorted(map(tuple, df.collect())) for name, df in predictions.items()}
    for df in predictions.values():
        df.unpersist()
    assert cache_is_empty(spark)  # nothing else stays cached
    assert set(report["ranking"]) == {"recsys", "popular", "bought_together", "fused_without_behaviour",
                                      "fused_without_metadata", "behaviour", "metadata"}
    assert set(report["items"]) == set(report["ranking"]) - {"recsys", "popular"} | {"fused"}
    # leaving one of two modalities out is the other alone
    strip = lambda rows: [(c, r, a) for c, r, a, _, _ in rows]  # noqa: E731
    assert strip(first["fused_without_metadata"]) == strip(first["behaviour"])
    assert strip(first["fused_without_behaviour"]) == strip(first["metadata"])
    assert strip(first["recsys"]) not in (strip(first["behaviour"]), strip(first["metadata"]))
    assert report["split"]["validation_customers"] == report["ranking"]["recsys"]["customers"] > 0
    # q00 was only bought in the validation week: no list may hold it
    assert all(a != "q00" for rows in first.values() for _, _, a, _, _ in rows)
    # changing what was bought in the validation week changes the scores, never the lists
    split = time_split(tx, 7)
    moved = split.train.unionByName(split.validation.withColumn("article_id", F.lit("p00")))
    fewer = cfg.evaluate.model_copy(update={"leave_one_out": False, "each_modality": False})  # type: ignore[attr-defined]
    report2, predictions2 = evaluate_split(spark, cfg.model_copy(update={"evaluate": fewer}), moved, customers,  # type: ignore[attr-defined]
                                           articles)
    second = {name: sorted(map(tuple, df.collect())) for name, df in predictions2.items()}
    for df in predictions2.values():
        df.unpersist()
    assert set(second) == {"recsys", "popular", "bought_together"}
    assert second == {name: rows for name, rows in first.items() if name in second}
    assert report2["ranking"]["popular"]["map_at_k"] != report["ranking"]["popular"]["map_at_k"]


def test_customers_stage_checks_before_it_commits(spark, warehouse: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A run whose lists fail the 12-per-customer check leaves the published table untouched."""
    from delta.tables import DeltaTable

    from recsys.stages import customers as customers_module

    db = "customers_commit"
    cfg = test_config(warehouse, db)
    tables.ensure_tables(spark, db)
    tx = purchases(spark)
    write_table(spark, db, tables.TRANSACTIONS, tx.withColumn("row_number", F.monotonically_increasing_id()))
    write_table(spark, db, tables.CUSTOMERS, spark.createDataFrame([(f"cust{c:02d}",) for c in range(40)], "customer_id string"))
    write_table(spark, db, tables.ARTICLES, tx.select("article_id").distinct())
    write_table(spark, db, tables.ITEM_RECOMMENDATIONS, spark.createDataFrame(
        [(f"p{i:02d}", 1, f"p{(i + 1) % 30:02d}", 0.9) for i in range(30)], "article_id string, rank int, recommended_id string, score float"))
    report = customers_module.run(spark, cfg, "c1")  # type: ignore[arg-type]
    assert (report["customers"], report["rows"], report["customers_short"]) == (40, 480, 0)
    published = tables.read(spark, db, tables.CUSTOMER_RECOMMENDATIONS)
    before = sorted(map(tuple, published.collect()))
    version = DeltaTable.forName(spark, f"{db}.customer_recommendations").history(1).first()["version"]

    honest = customers_module.customer_top_k
    monkeypatch.setattr(customers_module, "customer_top_k", lambda *args, **kwargs: honest(*args, **kwargs).where(
        ~((F.col("customer_id") == "cust05") & (F.col("rank") == 12))))
    # unchanged inputs and settings: nothing to do
    assert customers_module.run(spark, cfg, "c2") == {"skipped": "inputs unchanged since run c1"}  # type: ignore[arg-type]
    changed = cfg.model_copy(update={"customers": cfg.customers.model_copy(update={"popular_weight": 0.06})})  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="0 customers got no list and 1 fewer than 12; .* left as it was"):
        customers_module.run(spark, changed, "c2")  # type: ignore[arg-type]
    assert DeltaTable.forName(spark, f"{db}.customer_recommendations").history(1).first()["version"] == version
    assert sorted(map(tuple, tables.read(spark, db, tables.CUSTOMER_RECOMMENDATIONS).collect())) == before
