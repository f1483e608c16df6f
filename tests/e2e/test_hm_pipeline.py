"""The whole pipeline, through the spark-submit job entry point, once, on a slice of the real H&M data.

The slice (the first 2,500 articles of ../shared/data/hm, their transactions and customers)
is written to a temporary folder at test time; nothing of the H&M data is in the repository.
Every test here reads the tables of that one run. Quality extras no assertion needs (probe
iterations, t-SNE size, leave-one-out and single-modality lists, recall sample) are set small or
off; each has a targeted test of its own (tests/spark/test_quality.py, tests/unit/test_report.py,
tests/spark/test_evaluate.py, tests/spark/test_knn.py).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from jobs import refresh
from tests import reference
from tests.conftest import REPO, cache_is_empty, hm_data, runtime_settings

# one xdist worker runs this module (make test: --dist loadscope), so the pipeline runs once;
# its setup gets 25 minutes
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

N_ARTICLES = 2500
K = 12
DB = "e2e_hm"
# session keys Delta itself sets on the session it writes with (bookkeeping, not tuning)
SET_BY_DELTA = {
    "spark.databricks.delta.lastCommitVersionInSession",
    "spark.sql.parquet.fieldId.read.enabled",
    "spark.sql.parquet.fieldId.write.enabled",
}


def write_slice(source: Path, target: Path, n: int) -> set[str]:
    target.mkdir(parents=True)
    with open(source / "articles.csv", encoding="utf-8") as handle:
        lines = [next(handle) for _ in range(n + 1)]
    (target / "articles.csv").write_text("".join(lines), encoding="utf-8")
    ids = {line.split(",", 1)[0] for line in lines[1:]}
    customers: set[str] = set()
    with open(source / "transactions_train.csv", encoding="utf-8") as handle, open(
        target / "transactions_train.csv", "w", encoding="utf-8"
    ) as out:
        out.write(next(handle))
        for line in handle:
            fields = line.split(",")
            if fields[2] in ids:
                out.write(line)
                customers.add(fields[1])
    with open(source / "customers.csv", encoding="utf-8") as handle, open(
        target / "customers.csv", "w", encoding="utf-8"
    ) as out:
        out.write(next(handle))
        out.writelines(line for line in handle if line.split(",", 1)[0] in customers)
    (target / "images").symlink_to(source / "images")
    return ids


@dataclasses.dataclass(frozen=True)
class Run:
    ids: set[str]
    root: Path
    warehouse: Path
    reports: Path
    settings_before: dict[str, str]
    settings_after: dict[str, str]
    cache_empty_after: bool
    repo_before: set[str]
    repo_after: set[str]


@pytest.fixture(scope="module")
def hm_run(spark, warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:  # type: ignore[no-untyped-def]
    source = hm_data()
    base = tmp_path_factory.mktemp("hm-e2e")
    root = base / "hm"
    ids = write_slice(source.resolve(), root, N_ARTICLES)
    spark.catalog.clearCache()
    before = runtime_settings(spark)
    repo_before = {p.name for p in REPO.iterdir()}
    code = refresh.main(
        [
            "--conf", "hm",
            "--set", f"data.path={root}",
            "--set", f"data.database={DB}",
            "--set", f"spark.warehouse_dir={warehouse}",
            "--set", f"knn.k={K}",
            "--set", f"evaluate.report_dir={base / 'reports'}",
            # quality extras no assertion here needs, small (each has a targeted test)
            "--set", "knn.recall_sample=60",
            "--set", "quality.probe_max_iter=5",
            "--set", "evaluate.tsne_sample=200",
            "--set", "evaluate.strips=2",
            "--set", "evaluate.leave_one_out=false",
            "--set", "evaluate.each_modality=false",
            "--run-id", "e2e",
            "--evaluate",
        ]
    )
    assert code == 0
    return Run(ids, root, warehouse, base / "reports", before, runtime_settings(spark), cache_is_empty(spark), repo_before,
               {p.name for p in REPO.iterdir()})


def metrics_of(spark) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return dict(spark.table(f"{DB}.metrics").where("run_id = 'e2e'").select("name", "value").collect())


def test_the_job_leaves_the_session_and_the_repository_as_it_found_them(hm_run: Run) -> None:
    """conf/hm.yaml asks for 16 shuffle partitions and the embed stage tunes Arrow batches: the
    running (shared) session keeps its own settings; nothing stays cached; nothing is written
    into the working directory (the warehouse and reports are under tmp)."""
    changed = {k: (v, hm_run.settings_after.get(k)) for k, v in hm_run.settings_before.items()
               if hm_run.settings_after.get(k) != v}
    added = hm_run.settings_after.keys() - hm_run.settings_before.keys() - SET_BY_DELTA
    assert not changed and not added, (changed, added)
    assert hm_run.cache_empty_after
    assert hm_run.repo_after == hm_run.repo_before


def test_every_article_gets_k_recommendations_in_order(spark, hm_run: Run) -> None:  # type: ignore[no-untyped-def]
    recs = spark.table(f"{DB}.item_recommendations")
    articles = spark.table(f"{DB}.articles")
    assert articles.count() == len(hm_run.ids)
    per_article = dict(recs.groupBy("article_id").count().collect())
    assert set(per_article) == hm_run.ids  # every accepted article has a list
    assert set(per_article.values()) == {K}
    assert recs.where(F.col("article_id") == F.col("recommended_id")).count() == 0
    rows = recs.select("article_id", "rank", "score", "recommended_id").collect()
    by_article: dict[str, list[tuple[int, float, str]]] = {}
    for r in rows:
        by_article.setdefault(r["article_id"], []).append((r["rank"], r["score"], r["recommended_id"]))
    for lst in by_article.values():
        lst.sort()
        assert [r for r, _, _ in lst] == list(range(1, K + 1))
        for (_, s1, id1), (_, s2, id2) in zip(lst, lst[1:]):
            assert s1 > s2 or (s1 == s2 and id1 < id2)
    scored = {m for r in recs.select("modality_scores").collect() for m in r["modality_scores"]}
    # image and behaviour scores where both articles have an image or enough purchases
    assert scored == {"text", "image", "metadata", "behaviour"}


def test_images_are_trained_on_embedded_and_searched(spark, hm_run: Run, capsys) -> None:  # type: ignore[no-untyped-def]
    from recsys.cli import main

    metrics = metrics_of(spark)
    with_image = spark.table(f"{DB}.articles").where("image_path IS NOT NULL").count()
    assert metrics["train.images"] == with_image > 300
    assert 0.3 < metrics["train.holdout_accuracy"]  # better than chance over 10+ groups
    assert metrics["embed.image.embedded"] + metrics["embed.image.quarantined"] == with_image
    images = spark.table(f"{DB}.item_embeddings").where("modality = 'image'").count()
    assert images == metrics["embed.image.embedded"]
    assert metrics["neighbours.image.articles"] == images
    for modality in ("fused", "text", "image", "metadata", "behaviour"):
        assert f"neighbours.{modality}.probe_macro_f1" in metrics  # its value: tests/spark/test_quality.py
    assert main(["metrics", "--run-id", "e2e", "--conf", "hm", "--set", f"data.database={DB}"]) == 0
    out = capsys.readouterr().out
    assert "quality per modality" in out and "\nimage " in out


def test_recall_and_category_agreement_are_recorded(spark, hm_run: Run) -> None:  # type: ignore[no-untyped-def]
    metrics = metrics_of(spark)
    for modality in ("fused", "text", "metadata"):
        assert f"neighbours.{modality}.recall_at_k" in metrics
    assert metrics["neighbours.fused.recall_at_k"] >= 0.9
    assert metrics["ingest.files.articles.csv.input"] == N_ARTICLES
    assert metrics["ingest.files.articles.csv.accepted"] + metrics["ingest.files.articles.csv.quarantined"] == N_ARTICLES
    lines = sum(1 for _ in open(hm_run.root / "transactions_train.csv", encoding="utf-8")) - 1
    assert metrics["ingest.files.transactions_train.csv.input"] == lines
    assert spark.table(f"{DB}.transactions").count() == metrics["ingest.files.transactions_train.csv.accepted"]
    # neighbours mostly share the article's product type (computed here, independently)
    recs = spark.table(f"{DB}.item_recommendations")
    types = spark.table(f"{DB}.articles").select("article_id", F.col("attributes")["product_type_name"].alias("t"))
    joined = recs.join(types, "article_id").join(
        types.select(F.col("article_id").alias("recommended_id"), F.col("t").alias("rt")), "recommended_id"
    )
    share = joined.agg(F.avg((F.col("t") == F.col("rt")).cast("double"))).first()[0]
    assert share > 0.6, share
    assert abs(metrics["neighbours.fused.category_precision_at_k"] - share) < 1e-3


def test_sql_and_similar_answer_from_the_catalog(spark, hm_run: Run, capsys) -> None:  # type: ignore[no-untyped-def]
    from recsys.cli import main

    article = sorted(hm_run.ids)[0]
    rows = spark.sql(
        f"SELECT recommended_id, score FROM {DB}.item_recommendations WHERE article_id = '{article}' ORDER BY rank"
    ).collect()
    assert len(rows) == K
    assert main(["similar", article, "--conf", "hm", "--set", f"data.database={DB}"]) == 0
    out = capsys.readouterr().out
    assert rows[0]["recommended_id"] in out and article in out


def test_every_customer_gets_twelve_and_the_submission_has_them(spark, hm_run: Run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from recsys.cli import main

    customers = {r["customer_id"] for r in spark.table(f"{DB}.customers").collect()}
    recs = spark.table(f"{DB}.customer_recommendations")
    per_customer = dict(recs.groupBy("customer_id").count().collect())
    assert set(per_customer) == customers and set(per_customer.values()) == {12}
    reasons = {r["reason"].split(":")[0] for r in recs.select("reason").distinct().collect()}
    assert reasons <= {"similar_to", "repurchase", "popular"} and "similar_to" in reasons
    seeds = recs.where(F.col("reason").startswith("similar_to:")).select(F.substring("reason", 12, 10).alias("a"))
    assert seeds.join(spark.table(f"{DB}.articles"), F.col("a") == F.col("article_id"), "left_anti").count() == 0
    out = tmp_path / "submission.csv"
    assert main(["export-submission", str(out), "--conf", "hm", "--set", f"data.database={DB}"]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "customer_id,prediction" and len(lines) == len(customers) + 1
    first_id, prediction = lines[1].split(",")
    ranked = [r["article_id"] for r in recs.where(F.col("customer_id") == first_id).orderBy("rank").collect()]
    assert prediction.split(" ") == ranked


def test_evaluate_figures_equal_a_brute_force_recount(spark, hm_run: Run) -> None:  # type: ignore[no-untyped-def]
    """The split, MAP@12 of the popularity baseline, and category precision@12 and co-purchase hit
    rate@12 of the bought-together lists, recounted in plain Python from the slice's CSV files."""
    metrics = metrics_of(spark)
    purchases = reference.read_purchases(hm_run.root / "transactions_train.csv")
    train, validation = reference.split_by_days(purchases, 7)
    pairs = reference.copurchase_pairs(validation, 7)
    categories = {r["article_id"]: r["category_l3"] for r in spark.table(f"{DB}.articles").collect()}
    precision, hit_rate = reference.list_metrics(reference.bought_together(train, 7, K), categories, pairs)
    expected = {
        "evaluate.split.train_transactions": len(train),
        "evaluate.split.validation_customers": len({c for _, c, _ in validation}),
        "evaluate.ranking.recsys.customers": len({c for _, c, _ in validation}),
        "evaluate.ranking.popular.map_at_k": reference.mean_average_precision(
            reference.popular_list(train, hm_run.ids, K, 7), validation, K),
        "evaluate.split.copurchase_pairs": len(pairs),
        "evaluate.items.bought_together.category_precision_at_k": precision,
        "evaluate.items.bought_together.copurchase_hit_rate_at_k": hit_rate,
    }
    # one comparison, so a failure names every figure that differs
    assert {name: metrics.get(name) for name in expected} == pytest.approx(expected, abs=1e-9)
    assert expected["evaluate.split.validation_customers"] > 0 and len(pairs) > 0
    assert {"recsys", "bought_together"} <= {n.split(".")[2] for n in metrics if n.startswith("evaluate.ranking.")}
    assert "evaluate.items.fused.category_precision_at_k" in metrics

    html = (hm_run.reports / "e2e" / "index.html").read_text(encoding="utf-8")
    assert "MAP@12" in html and "data:image/png;base64," in html and "data:image/jpeg;base64," in html


def test_the_trained_classifier_is_recounted_and_a_current_checkpoint_is_kept(spark, hm_run: Run) -> None:  # type: ignore[no-untyped-def]
    """The petastorm training of this run: the loss falls; the classes and the held-out accuracy
    and macro-F1 are recounted here from the slice's articles.csv, its image files and the
    checkpoint (scikit-learn); the ``latest`` pointer names the checkpoint, whose backbone serves
    the image vectors; a second train with the same images and recipe keeps it."""
    import torch

    from recsys.config import load_config
    from recsys.encoders.image import load_backbone, read_checkpoint
    from recsys.pipeline import run
    from recsys.training import holdout_column

    report = json.loads(tables_row(spark, "runs", "report"))
    trained = report["train"]
    cfg = load_config("hm", [f"data.path={hm_run.root}", f"data.database={DB}",
                             f"spark.warehouse_dir={hm_run.warehouse}"])
    losses = trained["epoch_loss"]
    assert len(losses) == cfg.train.epochs and losses[-1] < losses[0] - 0.1, losses
    checkpoint = read_checkpoint(trained["checkpoint"])
    assert checkpoint["arch"] == cfg.image.arch and checkpoint["metrics"]["holdout_macro_f1"] == trained["holdout_macro_f1"]

    # product group (product_code) and label (product_group_name) of every article with an image file
    with open(hm_run.root / "articles.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    image = {r["article_id"]: hm_run.root / "images" / r["article_id"][:3] / f"{r['article_id']}.jpg" for r in rows}
    with_file = sorted((r["article_id"], r["product_code"], r["product_group_name"]) for r in rows
                       if r["product_group_name"] and image[r["article_id"]].is_file())
    groups = sorted({g for _, g, _ in with_file})
    held_out = {r["g"] for r in spark.createDataFrame([(g,) for g in groups], "g string")
                .where(holdout_column(F.col("g"), cfg.train.seed, cfg.train.holdout)).collect()}
    counts = Counter(label for _, g, label in with_file if g not in held_out)
    kept = sorted(c for c, n in counts.items() if n >= cfg.train.min_class_count)
    assert checkpoint["classes"] == kept + (["other"] if len(kept) < len(counts) else [])
    index = {c: i for i, c in enumerate(checkpoint["classes"])}
    scored_ids = [(a, label) for a, g, label in with_file if g in held_out]
    accuracy, macro, scored = reference.classifier_scores(
        trained["checkpoint"], [image[a].read_bytes() for a, _ in scored_ids],
        [index.get(label, index.get("other", -1)) for _, label in scored_ids])
    assert trained["holdout_images"] == len(scored_ids) and scored > 0
    assert (trained["holdout_accuracy"], trained["holdout_macro_f1"]) == (pytest.approx(accuracy, abs=1e-4),
                                                                         pytest.approx(macro, abs=1e-4))

    latest = json.loads((hm_run.warehouse / "models" / "image" / f"latest-{cfg.image.arch}.json").read_text())
    assert latest["model_id"] == trained["model_id"] and Path(latest["checkpoint"]).is_file()
    backbone = load_backbone(cfg.image.arch, trained["checkpoint"])
    with torch.inference_mode():
        out = backbone(torch.zeros(1, 3, cfg.image.height, cfg.image.width))
    dims = {r["dim"] for r in spark.table(f"{DB}.item_embeddings").where("modality = 'image'").select("dim").collect()}
    assert dims == {out.shape[1]}
    assert report["embed"]["image"]["model_id"].startswith(trained["model_id"] + "@")

    # the same images and recipe: training is skipped and the checkpoint kept, also when asked
    # to retrain on new images (the labelled images are the same, so the recipe matches too)
    second = run(spark, cfg, "e2e-train", ("train",))["train"]
    assert second["skipped"] == "checkpoint is current" and second["model_id"] == trained["model_id"]
    recheck = run(spark, cfg.model_copy(update={"train": cfg.train.model_copy(update={"retrain_on_new_images": True})}),
                  "e2e-train", ("train",))["train"]
    assert recheck["skipped"] == "checkpoint is current" and recheck["model_id"] == trained["model_id"]


def tables_row(spark, table: str, column: str) -> str:  # type: ignore[no-untyped-def]
    """``column`` of the e2e run's row in ``table``."""
    return spark.table(f"{DB}.{table}").where("run_id = 'e2e'").select(column).first()[0]
