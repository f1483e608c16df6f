"""pandas-UDF factories around the encoders: driver-side spec, executor-side closure.

The driver builds a small picklable spec; each Python worker loads the model once (iterator UDF),
embeds Arrow batches, and picks its GPU from the task's resources when the cluster schedules
GPUs (``spark.task.resource.gpu.amount``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql.functions import pandas_udf
from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

logger = logging.getLogger(__name__)


# Models loaded by this Python worker, by (what, device); workers are reused across tasks
# (spark.python.worker.reuse, on by default), so each loads a model once.
_MODELS: dict[tuple[Any, str], Any] = {}


@dataclass(frozen=True)
class TextEmbedderSpec:
    """What a worker needs to embed text: model location, batching and threads."""

    model_path: str
    batch_size: int = 64
    max_length: int = 128
    torch_threads: int = 1


def task_device() -> str:
    """``cuda:<n>`` for the GPU Spark assigned to this task, ``cuda:0`` when CUDA is present but
    Spark does not schedule GPUs (local mode), else ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    from pyspark import TaskContext

    context = TaskContext.get()
    gpus = context.resources().get("gpu") if context is not None else None
    if gpus is not None and gpus.addresses:
        return f"cuda:{gpus.addresses[0]}"
    return "cuda:0"


def make_text_embedder(spec: TextEmbedderSpec):  # type: ignore[no-untyped-def]
    """An iterator pandas UDF ``string -> array<float>`` that embeds texts with ``spec``'s model.

    The model is loaded once per Python worker, before the batch loop; torch uses
    ``spec.torch_threads`` intra-op threads (cores ÷ concurrent tasks: more threads than cores
    halves throughput). Output rows are L2-normalised float32 of the model's hidden size.
    """

    @pandas_udf(ArrayType(FloatType(), False))  # type: ignore[call-overload]
    def embed(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        import torch

        from recsys.encoders.text import embed_texts, load_text_model

        torch.set_num_threads(spec.torch_threads)
        device = task_device()
        key = (spec.model_path, device)
        model = _MODELS.get(key)
        if model is None:  # once per Python worker: Spark reuses workers across tasks
            model = _MODELS[key] = load_text_model(spec.model_path, device)
        for texts in batches:
            vectors = embed_texts(
                model, texts.fillna("").tolist(), spec.batch_size, spec.max_length
            )
            yield pd.Series(list(vectors))

    return embed


@dataclass(frozen=True)
class ImageEmbedderSpec:
    """What a worker needs to embed images: architecture, weights, input size, batching, threads.

    ``weights`` is ``none``, ``torchvision:<NAME>`` or a checkpoint path. A checkpoint the driver
    shipped with ``SparkContext.addFile`` is found through ``SparkFiles`` on executors that cannot
    read the driver's path.
    """

    arch: str
    weights: str
    height: int
    width: int
    batch_size: int = 64
    torch_threads: int = 1
    max_pixels: int = 50_000_000
    seed: int = 0


IMAGE_RESULT = StructType(
    [StructField("vector", ArrayType(FloatType(), False)), StructField("error", StringType())]
)


def _local_weights(weights: str) -> str:
    if weights == "none" or weights.startswith("torchvision:") or os.path.exists(weights):
        return weights
    from pyspark import SparkFiles

    return SparkFiles.get(os.path.basename(weights))


def make_image_embedder(spec: ImageEmbedderSpec):  # type: ignore[no-untyped-def]
    """An iterator pandas UDF ``binary -> struct<vector: array<float>, error: string>``.

    Each row's encoded image is decoded and resized inside the UDF; a row that cannot be decoded
    gets ``vector = null`` and the reason in ``error`` (the caller quarantines it), so one bad
    file never fails the task. The model is loaded once per Python worker; on a GPU (from the
    task's resources) it runs channels-last under bf16 autocast.
    """

    @pandas_udf(IMAGE_RESULT)  # type: ignore[call-overload]
    def embed(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        import torch

        from recsys.encoders.image import embed_images, load_image_model

        torch.set_num_threads(spec.torch_threads)
        device = task_device()
        key = (spec, device)
        model = _MODELS.get(key)
        if model is None:  # once per Python worker: Spark reuses workers across tasks
            weights = _local_weights(spec.weights)
            model = _MODELS[key] = load_image_model(
                spec.arch, weights, spec.height, spec.width, device, spec.seed
            )
        for blobs in batches:
            vectors, errors = embed_images(model, blobs.tolist(), spec.batch_size, spec.max_pixels)
            yield pd.DataFrame({"vector": vectors, "error": errors})

    return embed


def vectors_to_numpy(column: pd.Series) -> np.ndarray:
    """Stack a pandas column of equal-length float arrays into ``(n, d)`` float32."""
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(column.to_numpy()).astype(np.float32, copy=False)
