"""The text encoder on CUDA (bf16 autocast) against CPU; skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_cuda_embeddings_match_cpu() -> None:
    from recsys.encoders.text import embed_texts, load_text_model, resolve_model_path

    texts = ["Strap top. Vest top. Black.", "Slim jeans in washed denim.", ""] * 20
    path = resolve_model_path(None)
    cpu = embed_texts(load_text_model(path, "cpu"), texts)
    gpu = embed_texts(load_text_model(path, "cuda:0"), texts)
    assert gpu.dtype == np.float32
    assert np.allclose(np.linalg.norm(gpu, axis=1), 1.0, atol=1e-3)
    assert float(np.min(np.sum(cpu * gpu, axis=1))) > 0.99  # bf16 autocast stays close


def test_text_udf_runs_on_the_gpu_and_matches_cpu(spark) -> None:  # type: ignore[no-untyped-def]
    from recsys.encoders.text import embed_texts, load_text_model, resolve_model_path
    from recsys.inference import TextEmbedderSpec, make_text_embedder

    texts = [f"Strap top {i}. Vest top. Black." for i in range(50)] + ["Slim jeans in washed denim."]
    path = resolve_model_path(None)
    df = spark.createDataFrame([(str(i), t) for i, t in enumerate(texts)], "article_id string, text string")
    rows = df.select("article_id", make_text_embedder(TextEmbedderSpec(path, 16, 128, 1))("text").alias("v")).collect()
    udf = np.array([r["v"] for r in sorted(rows, key=lambda r: int(r["article_id"]))], dtype=np.float32)
    cpu = embed_texts(load_text_model(path, "cpu"), texts)
    assert udf.shape == cpu.shape
    assert float(np.min(np.sum(cpu * udf, axis=1))) > 0.99
