"""Train stage: fit the image encoder on the catalogue's images and categories, fed by petastorm.

Spark reads the articles with an image and a label from Delta and the image bytes through
``binaryFile``; petastorm's ``make_spark_converter`` materialises them once as Parquet and
``make_torch_dataloader`` streams them into a PyTorch loop (Uber, petastorm, "Spark dataset
converter", https://petastorm.readthedocs.io). Decoding and augmentation (reflect-pad and random
crop, horizontal flip) run in petastorm's reader threads through a ``TransformSpec``.

- Classes: the category level ``train.label``; classes with fewer than ``train.min_class_count``
  training images merge into ``other``, and the loss weighs each class by
  ``count^-train.class_weight_power`` (default 0.5: ``1/sqrt(count)``; normalised to mean 1), so
  rare classes are not ignored.
- Held-out split: ``train.holdout`` of the product groups (``product_group_id``: colour and size
  variants of one product) by a seeded hash, so variants never straddle the split.
- Optimiser: AdamW with a one-cycle learning rate (Smith & Topin 2017), label smoothing;
  BatchNorm statistics with momentum 0.1 (short runs).
- Output: ``<models dir>/<model_id>.pt`` (``weights_only``-safe dict: arch, input size, classes,
  state_dict, held-out accuracy and macro-F1) plus ``<model_id>.json`` with the metrics, and
  ``latest-<arch>.json`` pointing at it; ``image.weights: trained`` embeds with that checkpoint.
- Idempotent: the recipe (settings plus a fingerprint of the labelled images) is stored with the
  checkpoint; a run whose recipe matches the latest checkpoint skips training.

The loop runs where the driver runs (its CUDA device when it has one).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys import tables
from recsys.config import Config
from recsys.session import sql_conf, warehouse_path
from recsys.sources.images import image_files

logger = logging.getLogger(__name__)

OTHER = "other"
# petastorm 0.13 calls pyarrow APIs deprecated since pyarrow 5 once per row group; the pins make
# them safe (DESIGN.md), so the repeated FutureWarnings are noise in the training log
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm\.")


def models_dir(cfg: Config) -> Path:
    """Where image checkpoints go: ``train.output_dir`` or ``<warehouse>/models``, plus ``/image``."""
    root = Path(cfg.train.output_dir).expanduser() if cfg.train.output_dir else warehouse_path(cfg) / "models"
    return root.resolve() / "image"


def latest_checkpoint(cfg: Config) -> dict[str, Any] | None:
    """The pointer ``latest-<arch>.json`` the last training wrote (``checkpoint``, ``model_id``,
    ``recipe``, ``metrics``), or ``None`` when nothing was trained for ``image.arch``."""
    pointer = models_dir(cfg) / f"latest-{cfg.image.arch}.json"
    if not pointer.is_file():
        return None
    info: dict[str, Any] = json.loads(pointer.read_text())
    return info if Path(info["checkpoint"]).is_file() else None


def resolve_image_weights(cfg: Config) -> str:
    """``image.weights`` with ``trained`` replaced by the latest trained checkpoint's path.

    Raises:
        FileNotFoundError: ``trained`` is configured and no checkpoint exists for ``image.arch``.
    """
    if cfg.image.weights != "trained":
        return cfg.image.weights
    latest = latest_checkpoint(cfg)
    if latest is None:
        raise FileNotFoundError(
            f"image.weights is 'trained' but no {cfg.image.arch} checkpoint is in {models_dir(cfg)}: "
            "run the train stage (`recsys train`, train.enabled: true) or set image.weights"
        )
    return str(latest["checkpoint"])


def holdout_column(group: Column, seed: int, share: float) -> Column:
    """True for the product groups held out: ``|xxhash64(group, seed)| mod 10,000 < share × 10,000``.

    One hash for every split of product groups (the image encoder's held-out images, the linear
    probe's test articles): with the same seed a smaller ``share`` selects a subset of the groups
    a larger one does, so the probe (``quality.holdout <= train.holdout``) is only ever scored
    on groups the encoder did not train on. Colour and size variants share a group, so they
    never straddle a split.

    Args:
        group: the product group column (string).
        seed: ``train.seed``.
        share: the share of groups held out, in (0, 1).
    """
    return F.abs(F.xxhash64(group, F.lit(seed))) % 10_000 < int(round(share * 10_000))


def labelled_images(spark: SparkSession, cfg: Config) -> DataFrame:
    """``(article_id, group, label, image_path, length, modification_time)`` of every article
    with an image file and a label; ``group`` is the product group (the article when absent)."""
    articles = (
        tables.read(spark, cfg.data.database, tables.ARTICLES)
        .where(F.col("image_path").isNotNull() & F.col(cfg.train.label).isNotNull())
        .select(
            "article_id",
            F.coalesce("product_group_id", "article_id").alias("group"),
            F.col(cfg.train.label).alias("label"),
            "image_path",
        )
    )
    files = image_files(spark, articles.select("image_path"))
    frame = articles.join(files, "image_path")
    if cfg.train.max_images:
        frame = frame.orderBy(F.xxhash64("article_id", F.lit(cfg.train.seed)), "article_id").limit(cfg.train.max_images)
    return frame


def training_settings(cfg: Config) -> str:
    """A 16-hex digest of what decides the training besides the images: ``train.*`` (not
    ``workers``, ``output_dir``, ``retrain_on_new_images``) and the image arch and size."""
    settings = cfg.train.model_dump(exclude={"workers", "output_dir", "retrain_on_new_images"})
    settings.update(arch=cfg.image.arch, height=cfg.image.height, width=cfg.image.width)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def training_recipe(cfg: Config, frame: DataFrame) -> tuple[str, int]:
    """A 16-hex digest of the settings (:func:`training_settings`) and the labelled images
    (article, label, path, size, modification time of each), and the number of images."""
    row_hash = F.xxhash64("article_id", "label", "image_path", "length", "modification_time")
    agg = tables.first_row(frame.agg(F.count(F.lit(1)).alias("n"), F.sum(row_hash.cast("decimal(38,0)")).alias("h")))
    text = json.dumps({"settings": training_settings(cfg), "images": int(agg["n"]), "fingerprint": str(agg["h"])},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16], int(agg["n"])


def _transform(height: int, width: int, max_pixels: int) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """petastorm's per-row-group transform: decode each image (a blank one with ``ok`` false
    when it cannot be decoded). Augmentation happens in the training loop, from a seeded
    generator, so that it does not depend on which reader thread decodes which row group."""
    def transform(batch: pd.DataFrame) -> pd.DataFrame:
        from recsys.encoders.image import ImageDecodeError, decode_image

        images, ok = [], []
        for data in batch["content"]:
            try:
                image = decode_image(data, height, width, max_pixels)
                ok.append(True)
            except ImageDecodeError:
                image = np.zeros((height, width, 3), dtype=np.uint8)
                ok.append(False)
            images.append(np.ascontiguousarray(image))
        return pd.DataFrame({"image": images, "label": batch["label"].astype(np.int64), "ok": ok})

    return transform


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random translation (reflect-pad by ``height // 16``, crop back) and horizontal flip.

    Args:
        images: ``(n, height, width, 3)`` uint8.
        rng: the training run's generator (seeded with ``train.seed``): the same batches in the
            same order get the same augmentation.

    Returns:
        ``(n, height, width, 3)`` uint8, a new array.
    """
    n, height, width, _ = images.shape
    pad = max(1, height // 16)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    out = np.empty_like(images)
    for i, (top, left) in enumerate(offsets):
        crop = padded[i, top : top + height, left : left + width]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, dict[int, float]]:
    """Macro-averaged F1 over the labels present in ``truth`` or ``predicted`` (as scikit-learn's
    ``f1_score(average="macro")``); a label with no true and no predicted positive is not counted.

    Args:
        truth, predicted: ``(n,)`` integer class labels.

    Returns:
        ``(macro_f1, {label: f1})``; ``nan`` for empty input.
    """
    labels = np.union1d(truth, predicted)
    scores: dict[int, float] = {}
    for label in labels:
        tp = float(np.sum((truth == label) & (predicted == label)))
        fp = float(np.sum((truth != label) & (predicted == label)))
        fn = float(np.sum((truth == label) & (predicted != label)))
        scores[int(label)] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return (float(np.mean(list(scores.values()))) if scores else float("nan")), scores


def fit_encoder(
    spark: SparkSession, cfg: Config, train_df: DataFrame, holdout_df: DataFrame, classes: list[str],
    class_counts: np.ndarray, n_train: int,
) -> dict[str, Any]:
    import torch
    from petastorm import TransformSpec
    from petastorm.spark import SparkDatasetConverter, make_spark_converter

    from recsys.encoders.image import build_classifier, to_tensor

    h, w = cfg.image.height, cfg.image.width
    cache = models_dir(cfg).parent / "petastorm-cache"
    cache.mkdir(parents=True, exist_ok=True)
    fields = [("image", np.uint8, (h, w, 3), False), ("ok", np.bool_, (), False)]
    spec = TransformSpec(_transform(h, w, cfg.image.max_pixels), edit_fields=fields,
                         selected_fields=["image", "label", "ok"])
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_classifier(cfg.image.arch, len(classes), h).to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for module in model.modules():
        # some torchvision models (MobileNetV3, EfficientNet) keep BatchNorm statistics with
        # momentum 0.01, tuned for ImageNet-length runs; a short run would evaluate with barely
        # updated running statistics
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    raw = np.maximum(class_counts, 1.0) ** -cfg.train.class_weight_power
    weight = torch.tensor(raw / raw.mean(), dtype=torch.float32, device=device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    steps_per_epoch = max(1, math.ceil(n_train / cfg.train.batch_size))
    total = steps_per_epoch * cfg.train.epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=cfg.train.learning_rate, total_steps=total + 1, pct_start=0.15)
    with sql_conf(spark, {SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF: cache.as_uri()}):
        train_conv = make_spark_converter(train_df, parquet_row_group_size_bytes=4 * 1024 * 1024)
        holdout_conv = make_spark_converter(holdout_df, parquet_row_group_size_bytes=4 * 1024 * 1024)
    epoch_loss: list[float] = []
    unreadable = 0
    fit_started = time.perf_counter()
    try:
        model.train()
        sums = np.zeros(cfg.train.epochs + 1)
        seen = np.zeros(cfg.train.epochs + 1)
        with train_conv.make_torch_dataloader(
            transform_spec=spec, batch_size=cfg.train.batch_size, num_epochs=cfg.train.epochs,
            workers_count=cfg.train.workers, shuffling_queue_capacity=min(max(n_train, 1), 4096),
            seed=cfg.train.seed,
        ) as loader:
            images = 0
            for batch in loader:
                ok = batch["ok"].to(device).bool()
                epoch = min(images // max(n_train, 1), cfg.train.epochs - 1)
                images += len(ok)
                if epoch == 0:
                    unreadable += int((~ok).sum())
                if not bool(ok.any()):
                    continue
                x = to_tensor(augment(batch["image"].numpy(), rng), device, channels_last=True)[ok]
                y = batch["label"].to(device)[ok]
                loss = loss_fn(model(x), y)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                if schedule.last_epoch < total:
                    schedule.step()
                sums[epoch] += float(loss.detach()) * len(y)
                seen[epoch] += len(y)
                if images % (steps_per_epoch * cfg.train.batch_size // 4 or 1) < len(ok):
                    logger.info("train: epoch %d, %d images, loss %.4f", epoch + 1, images, sums[epoch] / max(seen[epoch], 1))
        epoch_loss = [round(float(s / n), 4) for s, n in zip(sums, seen) if n]
        fit_seconds = time.perf_counter() - fit_started
        model.eval()
        truth, predicted = [], []
        with torch.inference_mode(), holdout_conv.make_torch_dataloader(
            transform_spec=spec, batch_size=256, num_epochs=1, workers_count=cfg.train.workers
        ) as loader:
            for batch in loader:
                ok = batch["ok"].numpy().astype(bool)
                logits = model(to_tensor(batch["image"].numpy(), device, channels_last=True))
                truth.append(batch["label"].numpy()[ok])
                predicted.append(logits.argmax(1).cpu().numpy()[ok])
    finally:
        train_conv.delete()
        holdout_conv.delete()
    y_true = np.concatenate(truth) if truth else np.zeros(0, dtype=np.int64)
    y_pred = np.concatenate(predicted) if predicted else np.zeros(0, dtype=np.int64)
    accuracy = float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")
    f1, per_class = macro_f1(y_true, y_pred)
    return {
        "model": model,
        "epoch_loss": epoch_loss,
        "accuracy": round(accuracy, 4),
        "macro_f1": round(f1, 4),
        "per_class_f1": {classes[k]: round(v, 4) for k, v in per_class.items()},
        "unreadable": unreadable,
        "fit_seconds": max(fit_seconds, 1e-9),
    }


def save_checkpoint(
    cfg: Config, classes: list[str], recipe: str, result: dict[str, Any], run_id: str, n_train: int, n_holdout: int
) -> dict[str, Any]:
    import torch

    from recsys.encoders.image import CHECKPOINT_FORMAT, state_digest

    state = {k: v.detach().cpu() for k, v in result["model"].state_dict().items()}
    mid = f"{cfg.image.arch}@{state_digest(state)}"
    folder = models_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{mid}.pt"
    metrics = {
        "holdout_accuracy": result["accuracy"],
        "holdout_macro_f1": result["macro_f1"],
        "train_images": n_train,
        "holdout_images": n_holdout,
    }
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": cfg.image.arch,
        "height": cfg.image.height,
        "width": cfg.image.width,
        "label": cfg.train.label,
        "classes": classes,
        "state_dict": state,
        "metrics": metrics,
        "recipe": recipe,
        "settings": training_settings(cfg),
        "run_id": run_id,
    }
    torch.save(checkpoint, path)
    info = {
        "model_id": mid,
        "checkpoint": str(path),
        "recipe": recipe,
        "settings": training_settings(cfg),
        "metrics": metrics,
        "per_class_f1": result["per_class_f1"],
        "epoch_loss": result["epoch_loss"],
        "run_id": run_id,
        "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / f"{mid}.json").write_text(json.dumps(info, indent=2) + "\n")
    (folder / f"latest-{cfg.image.arch}.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
