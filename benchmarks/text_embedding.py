"""Text-embedding throughput: the pandas UDF on Spark against a plain PyTorch loop.

Same 5,000 H&M article texts (the configured template), same model (all-MiniLM-L6-v2), same
batch size, same length-sorted batching, same total threads (2: the loop with 2 torch threads;
Spark local[2] with 2 Python workers of 1 thread each). Prints texts/s for each and the ratio
UDF / loop, and checks both give the same vectors.

    .venv/bin/python benchmarks/text_embedding.py [--n 5000]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import cold_and_warm_seconds, hm_path
from recsys.config import load_config
from recsys.encoders.text import embed_texts, load_text_model, resolve_model_path
from recsys.sources.schema import render_text


def hm_texts(n: int, template: str) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    with open(hm_path() / "articles.csv", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            ids.append(row["article_id"])
            texts.append(render_text(template, {
                "name": row["prod_name"], "description": row["detail_desc"], "category_l1": row["index_group_name"],
                "category_l2": row["product_group_name"], "category_l3": row["product_type_name"],
                "colour": row["colour_group_name"], "product_group_id": row["product_code"],
            }))
            if len(texts) == n:
                break
    return ids, texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args(argv)
    cfg = load_config("local")
    ids, texts = hm_texts(args.n, cfg.text.template)
    path = resolve_model_path(cfg.text.model)

    import torch
    from pyspark.sql import functions as F

    from recsys.inference import TextEmbedderSpec, make_text_embedder
    from recsys.session import build_spark

    warehouse = tempfile.mkdtemp(prefix="bench-warehouse-")
    spark = build_spark(load_config("local", ["spark.master=local[2]", f"spark.warehouse_dir={warehouse}",
                                              "spark.conf={spark.ui.enabled: 'false'}"]))
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.text.arrow_batch_size))
    spec = TextEmbedderSpec(path, cfg.text.batch_size, cfg.text.max_length, torch_threads=1)
    df = spark.createDataFrame(list(zip(ids, texts)), "article_id string, text string").repartition(2).persist()
    df.count()
    embedded = (
        df.sortWithinPartitions(F.length("text"))
        .select("article_id", make_text_embedder(spec)("text").alias("vector"))
    )
    udf_cold, udf_warm = cold_and_warm_seconds(embedded)
    udf_vectors = {r["article_id"]: np.asarray(r["vector"], np.float32) for r in embedded.collect()}

    torch.set_num_threads(2)
    model = load_text_model(path, "cpu")
    t0 = time.perf_counter()
    loop_vectors = embed_texts(model, texts, cfg.text.batch_size, cfg.text.max_length)
    loop = time.perf_counter() - t0

    diff = max(float(np.abs(udf_vectors[i] - v).max()) for i, v in zip(ids, loop_vectors))
    n = len(texts)
    print(f"texts: {n} H&M articles, batch {cfg.text.batch_size}, max_length {cfg.text.max_length}, 2 threads in all")
    print(f"{'path':<34}{'seconds':>9}{'texts/s':>10}{'ratio':>8}")
    print(f"{'plain PyTorch loop (2 threads)':<34}{loop:>9.1f}{n / loop:>10.1f}{1.0:>8.2f}")
    print(f"{'pandas UDF, warm workers':<34}{udf_warm:>9.1f}{n / udf_warm:>10.1f}{loop / udf_warm:>8.2f}")
    print(f"{'pandas UDF, cold (incl. start)':<34}{udf_cold:>9.1f}{n / udf_cold:>10.1f}{loop / udf_cold:>8.2f}")
    print(f"max |UDF - loop| over all vector components: {diff:.2e}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
