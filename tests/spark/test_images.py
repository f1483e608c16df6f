"""Images through Spark: corrupt and missing images, incremental image embedding, petastorm training."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from pyspark.sql import functions as F

from recsys import tables
from recsys.encoders.image import load_backbone, read_checkpoint
from recsys.pipeline import run
from recsys.training import holdout_column
from tests import reference
from tests.conftest import REPO, cache_is_empty, test_config

pytestmark = pytest.mark.spark

SAMPLE = REPO / "data" / "sample" / "fashion"
N = 40


def write_catalogue(root: Path, n: int = N) -> dict[str, str]:
    """The first ``n`` sample articles with copies of their images, five of them spoilt.

    Returns ``{article_id: what is wrong}`` for the spoilt ones.
    """
    root.mkdir(parents=True)
    lines = (SAMPLE / "styles.csv").read_text().splitlines(keepends=True)[: n + 1]
    (root / "styles.csv").write_text("".join(lines))
    ids = [line.split(",", 1)[0] for line in lines[1:]]
    images = root / "images"
    images.mkdir()
    for article_id in ids:
        (images / f"{article_id}.jpg").write_bytes((SAMPLE / "images" / f"{article_id}.jpg").read_bytes())
    big = io.BytesIO()
    Image.new("RGB", (200, 200), (10, 200, 10)).save(big, "JPEG")
    spoilt = {
        ids[0]: "empty file",
        ids[1]: "corrupt image",
        ids[2]: "not an image",
        ids[3]: "too large",
        ids[4]: "no image",
    }
    (images / f"{ids[0]}.jpg").write_bytes(b"")
    (images / f"{ids[1]}.jpg").write_bytes((images / f"{ids[1]}.jpg").read_bytes()[:300])
    (images / f"{ids[2]}.jpg").write_text("<html>404 not found</html>")
    (images / f"{ids[3]}.jpg").write_bytes(big.getvalue())  # 40,000 pixels > image.max_pixels below
    (images / f"{ids[4]}.jpg").unlink()
    return spoilt


def image_rows(spark, db: str) -> set[str]:  # type: ignore[no-untyped-def]
    rows = tables.read(spark, db, tables.ITEM_EMBEDDINGS).where(F.col("modality") == "image").collect()
    return {r["article_id"] for r in rows}


def test_bad_images_are_quarantined_and_articles_keep_their_other_modalities(spark, warehouse: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = "images_bad"
    spoilt = write_catalogue(tmp_path / "fp")
    cfg = test_config(
        warehouse, db, f"data.path={tmp_path / 'fp'}", "text.enabled=false", "image.weights=none",
        "image.max_pixels=10000", "image.height=64", "image.width=48",
    )
    spark.catalog.clearCache()
    report = run(spark, cfg, "r1", ("ingest", "train", "embed"))
    assert cache_is_empty(spark)  # what the stages cached while writing item_embeddings is gone
    image = report["embed"]["image"]
    assert report["train"] == {"skipped": "image.weights is not 'trained'", "seconds": report["train"]["seconds"]}
    assert (image["articles_with_image"], image["missing_files"], image["quarantined"], image["embedded"]) == (N - 1, 0, 4, N - 5)

    rejects = tables.read(spark, db, tables.QUARANTINE).where(F.col("stage") == "embed").collect()
    found = {r["record"].removeprefix("article_id="): r for r in rejects}
    assert sorted(found) == sorted(a for a, why in spoilt.items() if why != "no image")
    for article_id, row in found.items():
        assert spoilt[article_id] in row["reason"], row["reason"]
        assert row["source"].endswith(f"/{article_id}.jpg") and row["run_id"] == "r1"

    good = {a for a in image_rows(spark, db)}
    assert len(good) == N - 5 and not good & set(spoilt)
    fused = tables.read(spark, db, tables.ITEM_EMBEDDINGS).where(F.col("modality") == "fused")
    assert fused.count() == N  # every article is fused from what it has
    dims = {r["dim"] for r in tables.read(spark, db, tables.ITEM_EMBEDDINGS).where(F.col("modality") == "image").collect()}
    assert dims == {576}

    # incremental: unchanged files are not embedded again; bad ones are reported again
    again = run(spark, cfg, "r2", ("embed",))["embed"]["image"]
    assert (again["embedded"], again["skipped"], again["quarantined"]) == (0, N - 5, 4)
    # a file that vanishes after ingest: counted missing, its stale vector removed
    gone = sorted(good)[0]
    (tmp_path / "fp" / "images" / f"{gone}.jpg").unlink()
    third = run(spark, cfg, "r3", ("embed",))["embed"]["image"]
    assert (third["missing_files"], third["stale_removed"], third["embedded"]) == (1, 1, 0)
    assert image_rows(spark, db) == good - {gone}


def test_petastorm_training_lowers_the_loss_and_its_checkpoint_serves_embeddings(spark, warehouse: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = "images_train"
    write_catalogue(tmp_path / "fp", 120)
    models = tmp_path / "models"
    cfg = test_config(
        warehouse, db, f"data.path={tmp_path / 'fp'}", "text.enabled=false", "image.max_pixels=10000",
        "image.height=64", "image.width=48", "train.epochs=10", "train.min_class_count=9", "train.batch_size=16",
        f"train.output_dir={models}",
    )
    spark.catalog.clearCache()
    report = run(spark, cfg, "t1", ("ingest", "train", "embed"))
    assert cache_is_empty(spark)  # the labelled images the train stage cached are unpersisted
    trained = report["train"]
    assert trained["images"] == 119  # one article has no image file
    assert trained["unreadable_images"] > 0  # the spoilt files are masked out of the loss, not fatal
    assert trained["train_images"] + trained["holdout_images"] == 119 and trained["holdout_images"] > 0
    losses = trained["epoch_loss"]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.1, losses

    checkpoint = read_checkpoint(trained["checkpoint"])
    assert checkpoint["arch"] == "mobilenet_v3_small" and checkpoint["metrics"]["holdout_macro_f1"] == trained["holdout_macro_f1"]
    # the classes and held-out scores, recounted here from styles.csv, the files and the checkpoint;
    # min_class_count 9 sits on this sample's edges: Bottomwear has 9 training images and Watches 8
    # (9 with its held-out one), so counting held-out images or "more than" changes the classes
    labels = {line.split(",")[0]: line.split(",")[3] for line in (tmp_path / "fp" / "styles.csv").read_text().splitlines()[1:]}
    with_file = sorted(a for a in labels if (tmp_path / "fp" / "images" / f"{a}.jpg").exists())
    held_out = {r["g"] for r in spark.createDataFrame([(a,) for a in with_file], "g string")
                .where(holdout_column(F.col("g"), cfg.train.seed, cfg.train.holdout)).collect()}  # type: ignore[attr-defined]
    counts = Counter(labels[a] for a in with_file if a not in held_out)
    kept = sorted(c for c, n in counts.items() if n >= cfg.train.min_class_count)  # type: ignore[attr-defined]
    assert checkpoint["classes"] == kept + (["other"] if len(kept) < len(counts) else [])
    index = {c: i for i, c in enumerate(checkpoint["classes"])}
    ids = sorted(held_out)
    accuracy, macro, scored = reference.classifier_scores(
        trained["checkpoint"], [(tmp_path / "fp" / "images" / f"{a}.jpg").read_bytes() for a in ids],
        [index.get(labels[a], index.get("other", -1)) for a in ids], max_pixels=10_000)
    assert trained["holdout_images"] == len(ids) and scored > 0
    assert (trained["holdout_accuracy"], trained["holdout_macro_f1"]) == (pytest.approx(accuracy, abs=1e-4),
                                                                         pytest.approx(macro, abs=1e-4))
    latest = json.loads((models / "image" / "latest-mobilenet_v3_small.json").read_text())
    assert latest["model_id"] == trained["model_id"] and Path(latest["checkpoint"]).is_file()
    backbone = load_backbone("mobilenet_v3_small", trained["checkpoint"])
    with torch.inference_mode():
        assert backbone(torch.zeros(1, 3, 64, 48)).shape == (1, 576)

    # embeddings come from the trained checkpoint
    assert report["embed"]["image"]["model_id"].startswith(trained["model_id"] + "@")
    assert len(image_rows(spark, db)) == 120 - 5

    # the same images and recipe: training is skipped, the checkpoint kept
    second = run(spark, cfg, "t2", ("train",))["train"]
    assert second["skipped"] == "checkpoint is current" and second["model_id"] == trained["model_id"]
    # asked to retrain on new images: the labelled images are the same, so the recipe matches too
    recheck = run(spark, cfg.model_copy(update={"train": cfg.train.model_copy(update={"retrain_on_new_images": True})}),
                  "t3", ("train",))["train"]
    assert recheck["skipped"] == "checkpoint is current" and recheck["model_id"] == trained["model_id"]
