"""Reading source CSV files line by line, splitting accepted rows from rejects.

Each file is read with Spark's ``text`` source (so the same code reads local disk, HDFS or an
object store), each line keeps its line number, and a pandas UDF parses it with Python's ``csv``
module and a per-source validator. A line that fails (wrong field count, bad id, unparsable
date or price, ...) becomes a quarantine record with its raw text and the reason; later lines
with a key already seen become ``duplicate`` rejects. Records must fit on one line (true of the
H&M and Fashion Product files).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType

from recsys.tables import first_row

logger = logging.getLogger(__name__)

REASON = "_reason"
ROW = "_row"
RECORD = "_record"

# fields: the parsed values by column; returns (normalised values, None) or (None, reason).
Validator = Callable[[dict[str, str]], tuple[dict[str, str | None] | None, str | None]]


class SourceError(ValueError):
    """A whole-file problem (missing file, missing required column); names the file and column."""


@dataclass(frozen=True)
class CsvSpec:
    """How to read one CSV file.

    Attributes:
        columns: the header columns required, in any order; extra columns are ignored.
        output: the columns the validator returns, all strings (typed later in Spark).
        validate: per-row validator, picklable (a module-level function).
        key: output columns that must be unique; later duplicates are rejected.
        repair_tail: if set, a row with too many fields joins the surplus into this (last)
            column: the Fashion Product names carry unquoted commas.
    """

    columns: tuple[str, ...]
    output: tuple[str, ...]
    validate: Validator
    key: tuple[str, ...] = ()
    repair_tail: str | None = None
    required_columns: tuple[str, ...] = field(default=())


@dataclass
class FileReport:
    """``input = accepted + quarantined`` for one source file.

    Attributes:
        source: the file.
        input: its record lines (the header and blank lines are not records).
        accepted: rows that passed validation (after the write: rows its table holds).
        quarantined: rows rejected with a reason (after the write: rows ``quarantine`` holds).
    """

    source: str
    input: int
    accepted: int
    quarantined: int

    @property
    def balanced(self) -> bool:
        return self.input == self.accepted + self.quarantined


@dataclass
class SourceRead:
    """One source file read and split: what a reader hands to the ingest stage.

    Attributes:
        accepted: the parsed rows that passed validation (the reader's typed columns).
        rejected: ``(source, row, record, reason)`` quarantine records.
        report: the counts of the parse (one aggregate).
        cached: DataFrames the reader persisted so the file is parsed once; :meth:`release`
            unpersists them once the writes are done.
    """

    accepted: DataFrame
    rejected: DataFrame
    report: FileReport
    cached: list[DataFrame] = field(default_factory=list)

    def release(self) -> None:
        """Unpersist what the reader cached."""
        for df in self.cached:
            df.unpersist()


def read_header(path: str) -> list[str]:
    """The header of a CSV file, read from its first line.

    Raises:
        SourceError: if the file does not exist or is empty.
    """
    local = Path(path)
    if "://" not in path and not local.is_file():
        raise SourceError(f"{path}: file not found")
    if "://" in path:
        return []  # checked after Spark reads the first line
    with open(local, encoding="utf-8", newline="") as handle:
        first = handle.readline()
    if not first.strip():
        raise SourceError(f"{path}: file is empty (no header line)")
    return next(csv.reader(io.StringIO(first)))


def _parse_lines(header: list[str], spec: CsvSpec) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    index = {name: header.index(name) for name in spec.columns}
    width = len(header)
    tail = header.index(spec.repair_tail) if spec.repair_tail else None
    validate = spec.validate
    out_cols = [*spec.output, REASON]

    def parse(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            rows: list[list[str | None]] = []
            for line in batch["value"]:
                values, reason = _parse_one(line, index, width, tail, validate)
                rows.append([values.get(c) for c in spec.output] + [reason])
            parsed = pd.DataFrame(rows, columns=out_cols, dtype=object)
            parsed[ROW] = batch["row"].to_numpy()
            parsed[RECORD] = batch["value"].to_numpy()
            yield parsed

    return parse


def _parse_one(
    line: str,
    index: dict[str, int],
    width: int,
    tail: int | None,
    validate: Validator,
) -> tuple[dict[str, str | None], str | None]:
    try:
        fields = next(csv.reader(io.StringIO(line)))
    except (csv.Error, StopIteration) as err:
        return {}, f"unparsable CSV line: {err}"
    if len(fields) > width and tail is not None and tail == width - 1:
        fields = fields[: width - 1] + [",".join(fields[width - 1 :])]
    if len(fields) != width:
        return {}, f"wrong field count: expected {width}, got {len(fields)}"
    values, reason = validate({name: fields[i] for name, i in index.items()})
    if values is None:
        return {}, reason or "rejected by validator"
    return values, None


def read_csv_checked(spark: SparkSession, path: str, spec: CsvSpec) -> SourceRead:
    """Read one CSV file into accepted rows and quarantine records.

    Args:
        spark: the session.
        path: the file (local path or URI).
        spec: columns, validator and key.

    Returns:
        A :class:`SourceRead`: ``accepted`` has the ``spec.output`` columns (strings) plus
        ``_row`` (1-based line number, the header is line 1); ``rejected`` has ``source``,
        ``row``, ``record``, ``reason``; ``report`` holds the counts, from one aggregate. The
        parsed lines are persisted (``release`` unpersists them).

    Raises:
        SourceError: the file is missing or empty, or its header lacks a required column.
    """
    header = read_header(path)
    lines = spark.read.text(path)
    if not header:
        first = lines.limit(1).collect()
        if not first:
            raise SourceError(f"{path}: file is empty (no header line)")
        header = next(csv.reader(io.StringIO(first[0]["value"])))
    missing = [c for c in spec.columns if c not in header]
    if missing:
        raise SourceError(f"{path}: missing required column(s) {missing}; header has {header}")

    numbered = (
        lines.rdd.zipWithIndex()
        .map(lambda pair: (pair[1] + 1, pair[0]["value"]))
        .toDF(StructType([StructField("row", LongType()), StructField("value", StringType())]))
        .where("row > 1 AND trim(value) != ''")
    )
    schema = StructType(
        [StructField(c, StringType()) for c in spec.output]
        + [StructField(REASON, StringType()), StructField(ROW, LongType()), StructField(RECORD, StringType())]
    )
    parsed = numbered.mapInPandas(_parse_lines(header, spec), schema)  # type: ignore[arg-type]
    if spec.key:
        first_seen = F.min(ROW).over(Window.partitionBy(*spec.key))
        parsed = parsed.withColumn(
            REASON,
            F.when(F.col(REASON).isNotNull(), F.col(REASON)).when(
                F.col(ROW) != first_seen,
                F.concat(
                    F.lit(f"duplicate {', '.join(spec.key)} (first at line "),
                    first_seen.cast("string"),
                    F.lit(")"),
                ),
            ),
        )
    parsed = parsed.persist()
    accepted = parsed.where(F.col(REASON).isNull()).drop(REASON, RECORD)
    rejected = parsed.where(F.col(REASON).isNotNull()).select(
        F.lit(path).alias("source"),
        F.col(ROW).alias("row"),
        F.col(RECORD).alias("record"),
        F.col(REASON).alias("reason"),
    )
    total = numbered.count()
    counts = first_row(parsed.agg(
        F.count(F.when(F.col(REASON).isNull(), 1)).alias("accepted"),
        F.count(REASON).alias("quarantined"),
    ))
    report = FileReport(
        source=path, input=total, accepted=int(counts["accepted"]), quarantined=int(counts["quarantined"])
    )
    logger.info(
        "read %s: %d rows, %d accepted, %d quarantined", path, total, report.accepted, report.quarantined
    )
    if not report.balanced:
        parsed.unpersist()
        raise RuntimeError(f"{path}: {total} input rows but {report.accepted} accepted + "
                           f"{report.quarantined} quarantined; rows were lost while parsing")
    return SourceRead(accepted, rejected, report, [parsed])
