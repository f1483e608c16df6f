"""Top-K nearest neighbours by cosine similarity on Spark: LSH, exact, and Spark MLlib's LSH.

Every backend returns the same table (the *top-K contract*): for each article its ``K`` most
similar other articles, ``rank`` 1..K without gaps, ordered by score descending then neighbour
``article_id`` ascending (ties break on the id); an article never lists itself; an article with
fewer than K candidates gets fewer rows, never padding. Scores are cosine similarities of the
L2-normalised input vectors (float32 dot products).

Backends (``knn.backend``):

``exact``
    Blocked all-pairs products. The vectors are cut into ``B`` blocks; each pair of blocks
    (query block, data block) is one *cell*, scored in one task as dense products of at most
    ``block_size`` query rows at a time, keeping each query's top-K (``torch.topk``). A global
    merge by query keeps the top-K over all data blocks. Memory per task is two blocks plus a
    ``block_size × block`` score matrix, never the whole ``n × n`` matrix. The ground truth.

``lsh`` (default)
    Bucketed candidates with exact re-scoring. Each of ``bands`` independent hash functions
    sends every article to one *home bucket*; a query article is scored exactly against the
    members of the ``probes`` buckets nearest to it (multi-probe), and its top-K over all
    bands is kept. Two hash families:

    - ``kmeans`` (default): k-means LSH. A bucket is a cell of a spherical k-means quantiser
      trained on a sample of the vectors; the probed buckets are the ``probes`` nearest
      centroids. Paulevé, Jégou & Amsaleg (2010), "Locality sensitive hashing: a comparison of
      hash function types and querying mechanisms", *Pattern Recognition Letters* 31(11),
      show k-means hash functions beat random projections at equal cost; multi-probe as in Lv
      et al. (2007), "Multi-Probe LSH", VLDB. Data-dependent buckets follow the data's
      density, so skewed clusters get more, not larger, buckets.
    - ``srp``: sign-random-projection LSH for cosine (Charikar 2002, "Similarity estimation
      techniques from rounding algorithms", STOC), banded as in Leskovec, Rajaraman & Ullman,
      *Mining of Massive Datasets* ch. 3.4: ``bits_per_band`` hyperplane signs per band, one
      bucket per signature, no multi-probe. Kept for comparison: on H&M text embeddings it
      needs about ten times the products of ``kmeans`` for the same recall.

    A bucket holding more than ``max_bucket_size`` members is ordered by a random projection
    and each query is scored against the window of ``max_bucket_size`` members around its own
    position, so a skewed bucket costs ``O(queries × max_bucket_size)``, never its square.
    Articles the buckets leave with fewer than ``min(K, n - 1)`` candidates get an exact search.

``mllib``
    Spark MLlib's ``BucketedRandomProjectionLSH.approxSimilarityJoin`` on the L2-normalised
    vectors (Euclidean distance ``sqrt(2 - 2 cos)``) with a threshold, then the top-K per
    article by a window: the baseline (:mod:`recsys.knn.mllib`).

Parameters and what they buy (``lsh``, measured by ``benchmarks/knn.py`` on the 99,830 H&M
text vectors, k=10, 2 cores; exact took 127 s): the default ``kmeans``, 1 band, buckets of about
60 (1,664 centroids), 20 probes: recall@10 0.953 in 38 s. 12 probes: 0.938 in 25 s. ``srp`` with
24 bands of 9 bits: 0.954 in 91 s (the last two before ``idx`` became the rank of article_id, ~6 s). Recall rises with ``probes`` and ``bands`` and falls with
smaller buckets; the work is about ``bands × probes × n × target_bucket_size`` products.

Incremental updates: :func:`fit_index` fits the hash functions once; :func:`update_top_k`
re-searches only the articles a change can affect and equals a full run with the same index.

How the work spreads (``exact`` and ``lsh``): the assignment of vectors to cells is a
``mapInArrow`` over the distributed vectors; rows ``(group, idx, vector, home cells, probed
cells)`` are grouped so each *group* of nearby cells is one call of a grouped Arrow function
(``groupBy("grp").applyInArrow``; an article is copied once per group it touches, not once per
probed cell), which scores the cells as dense ``torch`` products and emits each query's top-K in
that group; a second grouped function, by slices of the query index, merges them into the
global top-K. The driver holds only the hash functions
(centroids, hyperplanes), the k-means training sample (at most ``sample_size`` vectors) and
small counts: nothing collects all vectors.

Modules: :mod:`~recsys.knn.kernels` (numpy/torch, no Spark), :mod:`~recsys.knn.arrow` (Arrow
encoding), :mod:`~recsys.knn.index` (fit, assign, save, load), :mod:`~recsys.knn.exact`,
:mod:`~recsys.knn.search` (:func:`top_k`), :mod:`~recsys.knn.update` (:func:`update_top_k`),
:mod:`~recsys.knn.recall`, :mod:`~recsys.knn.mllib` (the baseline).
"""

from recsys.knn.index import fit_index
from recsys.knn.kernels import exact_top_k
from recsys.knn.mllib import MLlibParams
from recsys.knn.params import LSHIndex, LSHParams, Segments
from recsys.knn.recall import recall_at_k
from recsys.knn.search import BACKENDS, top_k
from recsys.knn.update import update_top_k

__all__ = [
    "BACKENDS", "LSHIndex", "LSHParams", "MLlibParams", "Segments", "exact_top_k", "fit_index", "recall_at_k",
    "top_k", "update_top_k",
]
