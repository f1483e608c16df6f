"""Image-embedding throughput: the pandas UDF on Spark against a plain PyTorch loop.

Same H&M images (``../shared/data/hm/images``, the first ``--n`` files), same encoder, same input
size, same batch size, same decode + resize per image, same total threads (the loop with 2 torch
threads; Spark ``local[2]`` with 2 Python workers of 1 thread each). Prints images/s for each,
the ratio UDF / loop, and checks both give the same vectors.

With CUDA (``--device cuda``) the UDF runs on the GPU (channels-last, bf16 autocast) and the
benchmark also times the model alone on pre-decoded tensors (no JPEG decode), which is the
ceiling the UDF can approach.

    .venv/bin/python -m benchmarks.image_embedding [--n 4000] [--arch mobilenet_v3_small]
        [--weights none] [--height 128 --width 96] [--batch 64] [--device cpu]
    # the GPU figures the issue asks for:
    .venv/bin/python -m benchmarks.image_embedding --device cuda --arch resnet50 --height 224 \\
        --width 224 --batch 256 --n 10000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import cold_and_warm_seconds, hm_path
from recsys.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--arch", default="mobilenet_v3_small")
    parser.add_argument("--weights", default="none", help="none, torchvision:<NAME> or a checkpoint path")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (loop) = Spark task slots")
    args = parser.parse_args(argv)
    paths = sorted((hm_path() / "images").glob("*/*.jpg"))[: args.n]
    blobs = [p.read_bytes() for p in paths]
    ids = [p.stem for p in paths]

    import torch

    from recsys.encoders.image import decode_image, embed_batch, embed_images, load_image_model, to_tensor
    from recsys.inference import ImageEmbedderSpec, make_image_embedder
    from recsys.session import build_spark

    warehouse = tempfile.mkdtemp(prefix="bench-warehouse-")
    spark = build_spark(load_config("local", [f"spark.master=local[{args.threads}]", f"spark.warehouse_dir={warehouse}",
                                              "spark.conf={spark.ui.enabled: 'false'}"]))
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "256")
    spec = ImageEmbedderSpec(args.arch, args.weights, args.height, args.width, args.batch, torch_threads=1, seed=1)
    df = spark.createDataFrame(list(zip(ids, blobs)), "article_id string, content binary").repartition(args.threads).persist()
    df.count()
    embedded = df.select("article_id", make_image_embedder(spec)("content").alias("r"))
    udf_cold, udf_warm = cold_and_warm_seconds(embedded)
    udf_vectors = {r["article_id"]: np.asarray(r["r"]["vector"], np.float32) for r in embedded.collect()}
    spark.stop()

    torch.set_num_threads(args.threads)
    device = "cuda:0" if args.device == "cuda" else "cpu"
    model = load_image_model(args.arch, args.weights, args.height, args.width, device, seed=1)
    t0 = time.perf_counter()
    loop_vectors, _ = embed_images(model, blobs, args.batch)
    loop = time.perf_counter() - t0

    diff = max(float(np.abs(udf_vectors[i] - v).max()) for i, v in zip(ids, loop_vectors) if v is not None)
    n = len(blobs)
    print(f"images: {n} H&M product images, {args.arch} ({args.weights}), {args.height}x{args.width}, "
          f"batch {args.batch}, {args.device}, {args.threads} CPU threads in all")
    print(f"{'path':<38}{'seconds':>9}{'images/s':>10}{'ratio':>8}")
    print(f"{'plain PyTorch loop (decode + embed)':<38}{loop:>9.1f}{n / loop:>10.1f}{1.0:>8.2f}")
    print(f"{'pandas UDF, warm workers':<38}{udf_warm:>9.1f}{n / udf_warm:>10.1f}{loop / udf_warm:>8.2f}")
    print(f"{'pandas UDF, cold (incl. start)':<38}{udf_cold:>9.1f}{n / udf_cold:>10.1f}{loop / udf_cold:>8.2f}")
    if args.device == "cuda":
        decoded = np.stack([decode_image(b, args.height, args.width) for b in blobs[: args.batch * 8]])
        batches = [decoded[i : i + args.batch] for i in range(0, len(decoded), args.batch)]
        embed_batch(model, batches[0])  # warm-up (cuDNN autotune)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            for batch in batches:
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    model.model(to_tensor(batch, model.device, channels_last=True))
        torch.cuda.synchronize()
        alone = time.perf_counter() - t0
        count = 5 * len(decoded)
        print(f"{'model alone (decoded, bf16)':<38}{alone:>9.1f}{count / alone:>10.1f}{'':>8}")
    print(f"max |UDF - loop| over all vector components: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
