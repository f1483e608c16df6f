"""Synthetic embedding vectors for KNN benchmarks: clustered, skewed, low intrinsic dimension.

Every vector is a pure function of the generator's parameters and the item index, computed
inside the executors (``spark.range`` then ``mapInPandas``), so 1,000,000 × 384 floats never sit
on the driver and any partitioning gives bit-identical data. The random numbers come from a
counter-based hash (splitmix64's finaliser, Steele, Lea & Flood 2014, "Fast splittable
pseudorandom number generators", OOPSLA) of (seed, stream, item index, position), not from a
sequential generator, so any subset of items can be generated on its own.

Model, for item i:

1. Cluster: c ~ Zipf over ``clusters`` clusters, P(c) ∝ (c + 1)^-zipf_exponent (1.2). With the
   default ``clusters = round(sqrt(n))`` the largest cluster holds about a quarter of the items
   (P = 0.231 for 1,000,000 items in 1,000 clusters, the smallest expecting 58 items; P = 0.268
   for 20,000 items in 141 clusters, the smallest expecting 14).
2. Latent: z = centre_c + scale_c ⊙ g, g ~ N(0, I) in ``latent_dim`` (32) dimensions; centres
   ~ N(0, I), and each cluster has its own per-dimension spread (anisotropic clouds).
3. Ambient: x = normalise(z A) + ambient_noise · e / sqrt(dim), e ~ N(0, I), then L2-normalised;
   A is a fixed ``latent_dim × dim`` Gaussian matrix, so the vectors lie close to a 32-dimensional
   subspace, as real sentence embeddings lie close to a low-dimensional manifold.
4. Near-duplicates: a ``duplicate_share`` of the items (5 %) copy the vector of another, non-
   duplicate item j (regenerated from j's own index: no join) plus noise of norm
   ``duplicate_noise``, then L2-normalised; cosine to j ≈ 1 / sqrt(1 + 0.05²) ≈ 0.999.

    .venv/bin/python -m benchmarks.synthetic [--n 20000] [--dim 384] [--seed 0]

prints the cluster sizes and, on a sample of queries, the top-10 cosines next to random pairs.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession

SCHEMA = "article_id string, vector array<float>"
ID_WIDTH = 10  # article_id = f"{index:010d}"
DUPLICATE_TRIES = 8  # candidates drawn for a duplicate's source; all 8 being duplicates has p = 0.05^8

# hash streams: each use of randomness reads its own
_CLUSTER, _DUPLICATE, _LATENT, _AMBIENT, _DUPLICATE_NOISE = 1, 2, 3, 4, 5
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class SyntheticSpec:
    """The generator's parameters; small and picklable (it travels with the task closure)."""

    n: int = 1_000_000
    dim: int = 384
    seed: int = 0
    clusters: int = 1000
    zipf_exponent: float = 1.2
    latent_dim: int = 32
    spread: tuple[float, float] = (0.35, 0.7)  # per-cluster spread of the latent cloud, uniform in this range
    ambient_noise: float = 0.1
    duplicate_share: float = 0.05
    duplicate_noise: float = 0.05

    def check(self) -> None:
        """Raises: ValueError naming the first parameter out of range."""
        if self.n < 1 or self.dim < 1 or self.latent_dim < 1 or self.clusters < 1:
            raise ValueError(f"synthetic: n, dim, latent_dim and clusters must be >= 1, got {self}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"synthetic: seed must be in [0, 2**63), got {self.seed}")
        if not 0 <= self.duplicate_share < 1:
            raise ValueError(f"synthetic: duplicate_share must be in [0, 1), got {self.duplicate_share}")


@dataclass(frozen=True)
class SyntheticModel:
    """The fixed, shared part of the model: a few hundred KB, derived from the seed alone."""

    cumulative: np.ndarray  # (clusters,) float64, cumulative cluster probabilities, last = 1
    centres: np.ndarray  # (clusters, latent_dim) float64
    scales: np.ndarray  # (clusters, latent_dim) float64, per-dimension spread of each cluster
    mixing: np.ndarray  # (latent_dim, dim) float64, the matrix A


def cluster_probabilities(clusters: int, zipf_exponent: float) -> np.ndarray:
    """``(clusters,)`` float64, P(c) ∝ (c + 1)^-zipf_exponent, largest first, summing to 1."""
    weights = np.arange(1, clusters + 1, dtype=np.float64) ** -zipf_exponent
    return weights / weights.sum()


def build_model(spec: SyntheticSpec) -> SyntheticModel:
    rng = np.random.default_rng([spec.seed, 0x5EED])
    spread = rng.uniform(*spec.spread, size=(spec.clusters, 1))
    return SyntheticModel(
        cumulative=np.cumsum(cluster_probabilities(spec.clusters, spec.zipf_exponent)),
        centres=rng.standard_normal((spec.clusters, spec.latent_dim)),
        scales=spread * np.exp(0.5 * rng.standard_normal((spec.clusters, spec.latent_dim))),
        mixing=rng.standard_normal((spec.latent_dim, spec.dim)) / math.sqrt(spec.latent_dim),
    )


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (arithmetic wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, stream: int, index: np.ndarray, width: int) -> np.ndarray:
    """``(len(index), width)`` float64 in (0, 1): position j of item i, a pure function of
    (seed, stream, i, j)."""
    key = _mix(np.array([seed], dtype=np.uint64) * _GOLDEN + np.uint64(stream))
    item = _mix(np.asarray(index, dtype=np.int64).astype(np.uint64) * _GOLDEN + key)
    counters = item[:, None] + np.arange(1, width + 1, dtype=np.uint64)[None, :] * _GOLDEN
    return ((_mix(counters) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def normals(seed: int, stream: int, index: np.ndarray, width: int) -> np.ndarray:
    """``(len(index), width)`` float64 standard normals (Box-Muller on :func:`uniforms`)."""
    half = (width + 1) // 2
    u = uniforms(seed, stream, index, 2 * half)
    radius = np.sqrt(-2.0 * np.log(u[:, :half]))
    angle = 2.0 * np.pi * u[:, half:]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)[:, :width]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clusters_of(spec: SyntheticSpec, model: SyntheticModel, index: np.ndarray) -> np.ndarray:
    """``(len(index),)`` int64 cluster of each item's own draw (a duplicate's vector follows its
    source's cluster instead: see :func:`generate`)."""
    u = uniforms(spec.seed, _CLUSTER, index, 1)[:, 0]
    return np.minimum(np.searchsorted(model.cumulative, u, side="right"), spec.clusters - 1)


def sources_of(spec: SyntheticSpec, index: np.ndarray) -> np.ndarray:
    """``(len(index),)`` int64: the item whose base vector each item carries (itself, or for a
    near-duplicate the first of :data:`DUPLICATE_TRIES` random candidates that is no duplicate)."""
    index = np.asarray(index, dtype=np.int64)
    draws = uniforms(spec.seed, _DUPLICATE, index, 1 + DUPLICATE_TRIES)
    duplicate = draws[:, 0] < spec.duplicate_share
    source = index.copy()
    if duplicate.any():
        candidates = np.minimum((draws[duplicate, 1:] * spec.n).astype(np.int64), spec.n - 1)
        candidate_is_duplicate = (
            uniforms(spec.seed, _DUPLICATE, candidates.ravel(), 1)[:, 0] < spec.duplicate_share
        ).reshape(candidates.shape)
        first = np.argmax(~candidate_is_duplicate, axis=1)  # 0 when all are duplicates (p = 0.05^8)
        source[duplicate] = candidates[np.arange(len(candidates)), first]
    return source


def generate(
    spec: SyntheticSpec, index: np.ndarray, model: SyntheticModel | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The vectors of the given items, Spark-free.

    Args:
        spec: the generator's parameters.
        index: ``(m,)`` int64 item indices in ``[0, spec.n)``, any order, repeats allowed.
        model: :func:`build_model` of ``spec`` (built here when omitted).

    Returns:
        ``(vectors, cluster, source)``: ``(m, dim)`` float32 rows L2-normalised; ``(m,)`` int64
        cluster of each vector; ``(m,)`` int64 item whose base vector it carries (``index``
        itself except for near-duplicates).
    """
    model = model or build_model(spec)
    index = np.asarray(index, dtype=np.int64)
    source = sources_of(spec, index)
    cluster = clusters_of(spec, model, source)
    z = model.centres[cluster] + model.scales[cluster] * normals(spec.seed, _LATENT, source, spec.latent_dim)
    x = _normalise(z @ model.mixing)
    x += spec.ambient_noise / math.sqrt(spec.dim) * normals(spec.seed, _AMBIENT, source, spec.dim)
    x = _normalise(x)
    duplicate = source != index
    if duplicate.any():
        noise = normals(spec.seed, _DUPLICATE_NOISE, index[duplicate], spec.dim)
        x[duplicate] = _normalise(x[duplicate] + spec.duplicate_noise / math.sqrt(spec.dim) * noise)
    return x.astype(np.float32), cluster, source


def article_ids(index: np.ndarray) -> pd.Series:
    """Zero-padded ``article_id`` strings (``0000000042``) of item indices."""
    return pd.Series(np.char.zfill(np.asarray(index, dtype=np.int64).astype(str), ID_WIDTH))


def make_generator(spec: SyntheticSpec) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """Executor-side closure for ``mapInPandas``: ``id`` batches in, ``SCHEMA`` batches out. It
    captures only ``spec`` and builds the shared model once per task."""

    def generate_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        model = build_model(spec)
        for batch in batches:
            index = batch["id"].to_numpy()
            vectors, _, _ = generate(spec, index, model)
            yield pd.DataFrame({"article_id": article_ids(index), "vector": list(vectors)})

    return generate_batches


def synthetic_vectors(
    spark: SparkSession,
    n: int = 1_000_000,
    dim: int = 384,
    seed: int = 0,
    clusters: int | None = None,
    duplicate_share: float = 0.05,
    partitions: int | None = None,
) -> DataFrame:
    """``n`` synthetic embedding vectors, generated in the executors (see the module docstring).

    Args:
        spark: the session.
        n: number of items (``article_id`` ``0000000000`` .. ``f"{n - 1:010d}"``).
        dim: vector length.
        seed: fixes everything; same arguments, same vectors, whatever the partitioning.
        clusters: number of Zipf-sized clusters (exponent 1.2); ``None``: ``round(sqrt(n))``
            (1,000 for 1,000,000 items: the largest holds 23 % of the items, the smallest
            about 58 items).
        duplicate_share: share of items that are near-duplicates of another item.
        partitions: ``spark.range`` partitions; ``None``: one per 50,000 items, at least
            ``spark.sparkContext.defaultParallelism``.

    Returns:
        ``(article_id string, vector array<float>)``: one row per item, vectors of length
        ``dim``, float32, L2-normalised.

    Raises:
        ValueError: a parameter out of range (:meth:`SyntheticSpec.check`).
    """
    spec = SyntheticSpec(
        n=n, dim=dim, seed=seed, clusters=clusters or max(1, round(math.sqrt(n))), duplicate_share=duplicate_share
    )
    spec.check()
    parts = partitions or max(spark.sparkContext.defaultParallelism, math.ceil(n / 50_000))
    return spark.range(n, numPartitions=parts).mapInPandas(make_generator(spec), SCHEMA)  # type: ignore[arg-type]


def summary(spec: SyntheticSpec, queries: int = 500, k: int = 10) -> list[str]:
    """Lines describing the generated data, computed with numpy on all ``spec.n`` items (keep
    ``n`` small: the matrix is built on this process)."""
    index = np.arange(spec.n)
    vectors, cluster, source = generate(spec, index)
    sizes = np.sort(np.bincount(cluster, minlength=spec.clusters))[::-1]
    expected = cluster_probabilities(spec.clusters, spec.zipf_exponent)[0]
    q = np.random.default_rng(1).choice(spec.n, size=min(queries, spec.n), replace=False)
    scores = vectors[q] @ vectors.T
    scores[np.arange(len(q)), q] = -np.inf
    top = -np.sort(-scores, axis=1)[:, :k]
    neighbours = np.argsort(-scores, axis=1)[:, :k]
    same_cluster = (cluster[neighbours] == cluster[q][:, None]).mean()
    pairs = np.random.default_rng(2).integers(0, spec.n, size=(20_000, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    random = np.einsum("ij,ij->i", vectors[pairs[:, 0]], vectors[pairs[:, 1]])
    same = cluster[pairs[:, 0]] == cluster[pairs[:, 1]]
    qs = [0, 0.25, 0.5, 0.75, 0.9, 0.99, 1]
    return [
        f"items {spec.n:,}, dim {spec.dim}, latent {spec.latent_dim}, seed {spec.seed}, "
        f"{spec.clusters:,} clusters (Zipf {spec.zipf_exponent})",
        f"largest cluster: {sizes[0]:,} items = {sizes[0] / spec.n:.3f} of all (expected {expected:.3f}); "
        f"empty clusters: {int((sizes == 0).sum())}",
        "cluster size quantiles " + ", ".join(f"q{int(p * 100)} {int(np.quantile(sizes, p)):,}" for p in qs),
        f"near-duplicates: {int((source != index).sum()):,} = {(source != index).mean():.3f} of all",
        f"on {len(q)} sampled queries, cosine to the exact top-{k} (median over queries):",
        f"  top-1 {np.median(top[:, 0]):.3f}, mean of top-{k} {np.median(top.mean(1)):.3f}, "
        f"{k}th {np.median(top[:, -1]):.3f}; top-1 >= 0.99 (a near-duplicate) for {(top[:, 0] >= 0.99).mean():.3f}",
        f"  share of top-{k} neighbours in the query's cluster: {same_cluster:.3f}",
        f"random pairs: median {np.median(random):.3f}, q99 {np.quantile(random, 0.99):.3f}; "
        f"same-cluster pairs ({int(same.sum()):,}): median {np.median(random[same]):.3f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clusters", type=int, default=None, help="default: round(sqrt(n))")
    parser.add_argument("--no-spark", action="store_true", help="skip the Spark-vs-numpy identity check")
    args = parser.parse_args(argv)
    spec = SyntheticSpec(n=args.n, dim=args.dim, seed=args.seed, clusters=args.clusters or max(1, round(math.sqrt(args.n))))
    spec.check()
    for line in summary(spec):
        print(line)
    if args.no_spark:
        return 0

    from recsys.config import load_config
    from recsys.session import build_spark

    warehouse = tempfile.mkdtemp(prefix="bench-warehouse-")
    spark = build_spark(load_config("local", [f"spark.warehouse_dir={warehouse}", "spark.conf={spark.ui.enabled: 'false'}"]))
    expected, _, _ = generate(spec, np.arange(spec.n))
    for parts in (2, 7):
        df = synthetic_vectors(spark, spec.n, spec.dim, spec.seed, spec.clusters, spec.duplicate_share, parts)
        rows = df.orderBy("article_id").collect()
        got = np.asarray([r["vector"] for r in rows], dtype=np.float32)
        ids_ok = [r["article_id"] for r in rows] == list(article_ids(np.arange(spec.n)))
        same = got.shape == expected.shape and bool(np.array_equal(got, expected))
        print(f"Spark, {parts} partitions: {len(rows):,} rows, ids in order {ids_ok}, identical to numpy {same}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
