"""Arrow encoding shared by the Spark side of KNN: vectors as float32 bytes, candidate pairs,
cell rows, and the one-pass validation of input vectors (:data:`PREPARED_SCHEMA`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    FloatType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
)

from recsys.knn.params import Segments

PAIR_SCHEMA = StructType(
    [
        StructField("idx", LongType(), False),
        StructField("nidx", LongType(), False),
        StructField("score", FloatType(), False),
    ]
)

SEGMENT_FIELD = StructField("segment_scores", ArrayType(FloatType(), False), False)


def pair_schema(segments: Segments = (), ranked: bool = False) -> StructType:
    """Schema of candidate pairs: ``idx, nidx, score`` (+ ``segment_scores`` with segments,
    + ``rank`` when ranked). Without segments the column is left out rather than null: Arrow
    transfers of null arrays cost Spark 4.0 about 12 µs a row."""
    fields = [*PAIR_SCHEMA.fields, *([SEGMENT_FIELD] if segments else [])]
    return StructType([*fields, *([StructField("rank", IntegerType(), False)] if ranked else [])])


CELL_ROW_SCHEMA = StructType(
    [
        StructField("grp", LongType(), False),
        StructField("idx", LongType(), False),
        StructField("vec", BinaryType(), False),
        StructField("homes", ArrayType(LongType(), False), False),
        StructField("probes", ArrayType(LongType(), False), False),
    ]
)

VECTOR_OK, VECTOR_NULL, VECTOR_NONFINITE, VECTOR_ZERO = 0, 1, 2, 3

PREPARED_SCHEMA = StructType(
    [
        StructField("article_id", StringType(), True),
        StructField("idx", LongType(), False),
        StructField("vec", BinaryType(), False),
        StructField("dim", IntegerType(), False),
        StructField("flag", IntegerType(), False),
    ]
)


def vectors_of(column: pa.Array, dim: int) -> np.ndarray:
    """``(n, dim)`` float32 from an Arrow ``list<float>`` or ``binary`` column of equal-length rows."""
    if pa.types.is_binary(column.type):
        offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column) + 1]
        data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        return data.view(np.float32).reshape(len(column), dim).copy()
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), dim)


def binary_column(vectors: np.ndarray) -> pa.Array:
    """Arrow ``binary`` column, one row per vector (its float32 bytes), built without copies per row."""
    n, dim = vectors.shape
    offsets = np.arange(n + 1, dtype=np.int32) * (dim * 4)
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def list_column(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type))


def pairs_batch(idx: np.ndarray, nidx: np.ndarray, score: np.ndarray, seg: np.ndarray | None) -> pa.RecordBatch:
    columns = [pa.array(idx, pa.int64()), pa.array(nidx, pa.int64()), pa.array(score, pa.float32())]
    names = ["idx", "nidx", "score"]
    if seg is not None:
        n_seg = seg.shape[1]
        columns.append(list_column(np.arange(len(idx) + 1) * n_seg, seg.ravel().astype(np.float32), pa.float32()))
        names.append("segment_scores")
    return pa.RecordBatch.from_arrays(columns, names=names)


def cell_batch(
    grp: np.ndarray, idx: np.ndarray, vectors: np.ndarray, home_off: np.ndarray, home_val: np.ndarray,
    probe_off: np.ndarray, probe_val: np.ndarray,
) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(grp, pa.int64()), pa.array(idx, pa.int64()), binary_column(vectors),
         list_column(home_off, home_val, pa.int64()), list_column(probe_off, probe_val, pa.int64())],
        schema=pa.schema([
            pa.field("grp", pa.int64(), False), pa.field("idx", pa.int64(), False), pa.field("vec", pa.binary(), False),
            pa.field("homes", pa.list_(pa.field("element", pa.int64(), False)), False),
            pa.field("probes", pa.list_(pa.field("element", pa.int64(), False)), False),
        ]),
    )


def task_threads() -> None:
    """One torch thread per task core (more threads than cores halves throughput)."""
    import torch
    from pyspark import TaskContext

    context = TaskContext.get()
    torch.set_num_threads(max(1, int(context.cpus())) if context is not None else 1)


def prepare_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``(article_id, idx, vector list<float>)`` → :data:`PREPARED_SCHEMA`: the vector's float32
    bytes, its length and a flag (null vector, NaN/inf/null element, zero vector)."""
    for batch in batches:
        if batch.num_rows == 0:
            continue
        col = batch.column("vector")
        n = len(col)
        offsets = col.offsets.to_numpy().astype(np.int64)
        offsets = offsets - offsets[0]
        lengths = np.diff(offsets)
        values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)  # null elements → NaN
        null = col.is_null().to_numpy(zero_copy_only=False)
        finite = np.isfinite(values)
        bad = np.zeros(n, dtype=bool)
        norm2 = np.zeros(n, dtype=np.float64)
        nonempty = lengths > 0
        if len(values):
            starts = offsets[:-1][nonempty]
            bad[nonempty] = np.logical_or.reduceat(~finite, starts)
            norm2[nonempty] = np.add.reduceat(np.where(finite, values, 0).astype(np.float64) ** 2, starts)
        flag = np.where(null, VECTOR_NULL, np.where(bad, VECTOR_NONFINITE, np.where(norm2 == 0, VECTOR_ZERO, VECTOR_OK)))
        vec = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer((offsets * 4).astype(np.int32)),
                                                     pa.py_buffer(np.ascontiguousarray(values))])
        yield pa.RecordBatch.from_arrays(
            [batch.column("article_id"), batch.column("idx"), vec, pa.array(lengths.astype(np.int32)),
             pa.array(flag.astype(np.int32))],
            names=["article_id", "idx", "vec", "dim", "flag"],
        )
