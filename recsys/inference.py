"""pandas-UDF factories around the encoders: driver-side spec, executor-side closure.

The driver builds a small picklable spec; each Python worker loads the model once (iterator UDF),
embeds Arrow batches, and picks its GPU from the task's resources when the cluster schedules
GPUs (``spark.task.resource.gpu.amount``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql.functions import pandas_udf
from pyspark.sql.types import ArrayType, FloatType

from recsys.encoders.text import TextModel

logger = logging.getLogger(__name__)


# Models loaded by this Python worker, by (path, device); workers are reused across tasks
# (spark.python.worker.reuse, on by default), so each loads a model once.
_MODELS: dict[tuple[str, str], TextModel] = {}


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

        from recsys.encoders.text import embed_texts, load_text_model  # noqa: F811

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


def vectors_to_numpy(column: pd.Series) -> np.ndarray:
    """Stack a pandas column of equal-length float arrays into ``(n, d)`` float32."""
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(column.to_numpy()).astype(np.float32, copy=False)
