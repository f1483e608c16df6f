"""Train stage: fine-tune or train the image encoder on the catalogue's images (petastorm → PyTorch),
when its recipe changed; the library it uses is :mod:`recsys.training`."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from recsys.config import Config
from recsys.sources.images import image_files
from recsys.training import (
    OTHER,
    fit_encoder,
    holdout_column,
    labelled_images,
    latest_checkpoint,
    save_checkpoint,
    training_recipe,
    training_settings,
)

logger = logging.getLogger(__name__)


def run(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, Any]:
    """Train stage: fit ``image.arch`` on the labelled images and save the checkpoint.

    Skips (and says why) when ``image.weights`` is not ``trained``, images or training are off,
    no labelled image exists, or the latest checkpoint is current: it was trained with the same
    settings (:func:`~recsys.training.training_settings`), and, with
    ``train.retrain_on_new_images``, on the same labelled images too. So the daily run keeps its
    image model (and the image vectors of unchanged articles) while new images arrive, and
    retrains when the settings change or when asked.

    Returns:
        ``{model_id, checkpoint, images, train_images, holdout_images, classes, epochs,
        epoch_loss, holdout_accuracy, holdout_macro_f1, unreadable_images, seconds,
        images_per_s}``, or ``{skipped: reason, ...}``.
    """
    if not (cfg.image.enabled and cfg.train.enabled and cfg.image.weights == "trained"):
        reason = "image.weights is not 'trained'" if cfg.image.weights != "trained" else "train or image disabled"
        logger.info("train: skipped (%s)", reason)
        return {"skipped": reason}
    latest = latest_checkpoint(cfg)
    if latest is not None and not cfg.train.retrain_on_new_images and latest.get("settings") == training_settings(cfg):
        logger.info("train: skipped, checkpoint %s has these settings (train.retrain_on_new_images is off)",
                    latest["model_id"])
        return {"skipped": "checkpoint is current", "model_id": latest["model_id"], **latest.get("metrics", {})}
    frame = labelled_images(spark, cfg).persist()
    recipe, n_images = training_recipe(cfg, frame)
    if n_images == 0:
        frame.unpersist()
        logger.info("train: skipped (no article has both an image and a %s)", cfg.train.label)
        return {"skipped": "no labelled images", "images": 0}
    if latest is not None and latest.get("recipe") == recipe:
        frame.unpersist()
        logger.info("train: skipped, checkpoint %s already fits this recipe and these images", latest["model_id"])
        return {"skipped": "checkpoint is current", "model_id": latest["model_id"], **latest.get("metrics", {})}
    started = time.perf_counter()
    cached, frame = frame, frame.withColumn("holdout", holdout_column(F.col("group"), cfg.train.seed, cfg.train.holdout))
    counts = {r["label"]: int(r["n"]) for r in frame.where(~F.col("holdout")).groupBy("label").agg(F.count(F.lit(1)).alias("n")).collect()}
    kept = sorted(c for c, n in counts.items() if n >= cfg.train.min_class_count)
    classes = kept + ([OTHER] if len(kept) < len(counts) or not kept else [])
    index = spark.createDataFrame([(c, i) for i, c in enumerate(classes)], "label string, label_index int")
    other = classes.index(OTHER) if OTHER in classes else -1
    labelled = frame.join(F.broadcast(index), "label", "left").withColumn(
        "label_index", F.coalesce("label_index", F.lit(other))
    ).where(F.col("label_index") >= 0)
    # counts from the labelled rows (no image bytes): the bytes are read only when petastorm
    # materialises each split
    class_counts = np.zeros(len(classes))
    n_holdout = 0
    for r in labelled.groupBy("holdout", "label_index").count().collect():
        if r["holdout"]:
            n_holdout += int(r["count"])
        else:
            class_counts[r["label_index"]] = r["count"]
    n_train = int(class_counts.sum())
    files = image_files(spark, labelled.select("image_path"), content=True).select("image_path", "content")
    data = labelled.join(files, "image_path").select("content", F.col("label_index").alias("label"), "holdout")
    train_df = data.where(~F.col("holdout")).drop("holdout")
    holdout_df = data.where(F.col("holdout")).drop("holdout")
    logger.info(
        "train: %d images (%d train, %d held out), %d classes on %s, %s %dx%d, %d epochs",
        n_images, n_train, n_holdout, len(classes), cfg.train.label, cfg.image.arch, cfg.image.height,
        cfg.image.width, cfg.train.epochs,
    )
    try:
        result = fit_encoder(spark, cfg, train_df, holdout_df, classes, class_counts, n_train)
    finally:
        cached.unpersist()
    seconds = time.perf_counter() - started
    checkpoint = save_checkpoint(cfg, classes, recipe, result, run_id, n_train, n_holdout)
    report = {
        "model_id": checkpoint["model_id"],
        "checkpoint": checkpoint["checkpoint"],
        "images": n_images,
        "train_images": n_train,
        "holdout_images": n_holdout,
        "classes": len(classes),
        "epochs": cfg.train.epochs,
        "epoch_loss": result["epoch_loss"],
        "holdout_accuracy": result["accuracy"],
        "holdout_macro_f1": result["macro_f1"],
        "unreadable_images": result["unreadable"],
        "seconds": round(seconds, 2),
        "images_per_s": round(n_train * cfg.train.epochs / result["fit_seconds"], 1),
    }
    logger.info(
        "train: %s in %.0f s (%.1f images/s); held-out accuracy %.4f, macro-F1 %.4f; loss by epoch %s",
        report["model_id"], seconds, report["images_per_s"], result["accuracy"], result["macro_f1"],
        result["epoch_loss"],
    )
    return report
