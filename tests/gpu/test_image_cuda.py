"""The image encoder and its pandas UDF on CUDA (channels-last, bf16 autocast); skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import REPO

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

IMAGES = sorted((REPO / "data" / "sample" / "fashion" / "images").glob("*.jpg"))[:64]


def test_cuda_image_embeddings_match_cpu() -> None:
    from recsys.encoders.image import embed_images, load_image_model

    blobs = [p.read_bytes() for p in IMAGES]
    cpu, _ = embed_images(load_image_model("resnet50", "none", 224, 224, "cpu", seed=5), blobs, 32)
    gpu_model = load_image_model("resnet50", "none", 224, 224, "cuda:0", seed=5)
    assert gpu_model.channels_last
    gpu, _ = embed_images(gpu_model, blobs, 32)
    a, b = np.stack(cpu), np.stack(gpu)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-3)
    assert float(np.min(np.sum(a * b, axis=1))) > 0.99  # bf16 autocast stays close


def test_image_udf_runs_on_the_gpu_and_matches_cpu(spark) -> None:  # type: ignore[no-untyped-def]
    from recsys.encoders.image import embed_images, load_image_model
    from recsys.inference import ImageEmbedderSpec, make_image_embedder

    spec = ImageEmbedderSpec("resnet50", "none", 224, 224, batch_size=32, seed=5)
    df = spark.createDataFrame([(p.stem, p.read_bytes()) for p in IMAGES] + [("bad", b"")], "article_id string, content binary")
    rows = df.select("article_id", make_image_embedder(spec)("content").alias("r")).collect()
    good = {r["article_id"]: r["r"] for r in rows if r["article_id"] != "bad"}
    assert all(r["error"] is None and len(r["vector"]) == 2048 for r in good.values())
    assert [r["r"]["error"] for r in rows if r["article_id"] == "bad"] == ["empty file (0 bytes)"]
    cpu, _ = embed_images(load_image_model("resnet50", "none", 224, 224, "cpu", seed=5), [p.read_bytes() for p in IMAGES], 32)
    udf = np.array([good[p.stem]["vector"] for p in IMAGES], dtype=np.float32)
    assert float(np.min(np.sum(np.stack(cpu) * udf, axis=1))) > 0.99  # the UDF's CUDA vectors are the CPU ones
