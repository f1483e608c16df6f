"""Images through Spark: corrupt and missing images, incremental image embedding, petastorm training."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from pyspark.sql import functions as F

from recsys import tables
from recsys.pipeline import run
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
    # one short petastorm training (the e2e test checks a real one): the spoilt files are masked
    # out of its loss, not fatal
    cfg = test_config(
        warehouse, db, f"data.path={tmp_path / 'fp'}", "text.enabled=false", "image.max_pixels=10000",
        "image.height=64", "image.width=48", "train.epochs=1", "train.min_class_count=3", "train.batch_size=16",
        f"train.output_dir={tmp_path / 'models'}",
    )
    spark.catalog.clearCache()
    report = run(spark, cfg, "r1", ("ingest", "train", "embed"))
    assert cache_is_empty(spark)  # what the stages cached, the labelled images included, is gone
    image = report["embed"]["image"]
    trained = report["train"]
    assert trained["images"] == N - 1 and trained["unreadable_images"] > 0  # one article has no image file
    assert trained["train_images"] + trained["holdout_images"] == N - 1 and trained["holdout_images"] > 0
    assert image["model_id"].startswith(trained["model_id"] + "@")  # embedded with the checkpoint
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
