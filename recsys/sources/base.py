"""Reading source CSV files as RFC 4180 CSV, splitting accepted records from rejects.

Each file is parsed by Spark's CSV reader (so the same code reads local disk, HDFS or an object
store; a quoted field may span lines), each record keeps its number in the file, and a pandas
UDF checks it with a per-source validator. A record that fails (wrong field count, bytes that
are not valid UTF-8, bad id, unparsable date or price, ...) becomes a quarantine record with
its text and the reason; later records with a key already seen become ``duplicate`` rejects.
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
CORRUPT = "_corrupt_record"
REPLACEMENT = "\ufffd"  # what the decoder puts in place of bytes that are not valid UTF-8

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
        input: its records as Spark's CSV reader counts them (the header and blank lines are not records).
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
    with open(local, encoding="utf-8", errors="replace", newline="") as handle:
        first = handle.readline()
    if not first.strip():
        raise SourceError(f"{path}: file is empty (no header line)")
    return next(csv.reader(io.StringIO(first)))


def _parse_records(header: list[str], spec: CsvSpec) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The pandas UDF body: Spark's parsed fields (or, for a malformed record, its raw text)
    to the validator's output, the reason of a reject, the row and the record's text."""
    index = {name: header.index(name) for name in spec.columns}
    tail = header.index(spec.repair_tail) if spec.repair_tail else None
    validate = spec.validate
    out_cols = [*spec.output, REASON]
    field_cols = field_names(header)

    def parse(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            rows: list[list[str | None]] = []
            records: list[str] = []
            for *fields, raw in batch[[*field_cols, CORRUPT]].itertuples(index=False, name=None):
                if isinstance(raw, str):  # malformed for Spark: wrong field count, or a tail to repair
                    values, reason = _parse_raw(raw, header, index, tail, validate)
                    record = raw
                else:
                    texts = ["" if v is None else v for v in fields]
                    values, reason = _check(texts, header, index, validate)
                    record = _csv_text(texts)
                rows.append([values.get(c) for c in spec.output] + [reason])
                records.append(record)
            parsed = pd.DataFrame(rows, columns=out_cols, dtype=object)
            parsed[ROW] = batch[ROW].to_numpy()
            parsed[RECORD] = records
            yield parsed

    return parse


def field_names(header: list[str]) -> list[str]:
    """The names Spark reads the file's fields under: the header's, unless they repeat or clash
    with a name the reader adds (then ``_c0``, ``_c1``, ... by position)."""
    if len(set(header)) == len(header) and not {CORRUPT, ROW, REASON, RECORD} & set(header):
        return list(header)
    return [f"_c{i}" for i in range(len(header))]


def _csv_text(fields: list[str]) -> str:
    """One record's fields as an RFC 4180 line (the quarantined ``record``)."""
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(fields)
    return out.getvalue()


def _check(
    fields: list[str], header: list[str], index: dict[str, int], validate: Validator
) -> tuple[dict[str, str | None], str | None]:
    """Validate one record of the right width: invalid bytes first, then the source's rules."""
    for name, value in zip(header, fields):
        if REPLACEMENT in value:
            return {}, f"bytes not valid UTF-8 in column {name} (decoded as U+FFFD)"
    values, reason = validate({name: fields[i] for name, i in index.items()})
    if values is None:
        return {}, reason or "rejected by validator"
    return values, None


def _parse_raw(
    raw: str,
    header: list[str],
    index: dict[str, int],
    tail: int | None,
    validate: Validator,
) -> tuple[dict[str, str | None], str | None]:
    """A record Spark found malformed, parsed again from its raw text (RFC 4180, Python's ``csv``):
    a surplus of fields is joined into the ``tail`` column when that is the last one; any other
    width is a reject."""
    width = len(header)
    try:
        fields = next(csv.reader(io.StringIO(raw)))
    except (csv.Error, StopIteration) as err:
        return {}, f"unparsable CSV record: {err}"
    if len(fields) > width and tail is not None and tail == width - 1:
        fields = fields[: width - 1] + [",".join(fields[width - 1 :])]
    if len(fields) != width:
        return {}, f"wrong field count: expected {width}, got {len(fields)}"
    return _check(fields, header, index, validate)


def read_csv_checked(spark: SparkSession, path: str, spec: CsvSpec) -> SourceRead:
    """Read one CSV file into accepted rows and quarantine records.

    The file is parsed by Spark's CSV reader as RFC 4180 (``multiLine``: a quoted field may
    span lines; ``escape='"'``: a quote inside a quoted field is doubled; ``PERMISSIVE`` with a
    corrupt-record column keeping the raw text of a record with the wrong number of fields).
    A ``multiLine`` file is read by one task, in order, which numbers the records; validation
    then runs in parallel. Invalid UTF-8 bytes (which the decoder turns into U+FFFD) reject the
    record rather than being stored replaced.

    Args:
        spark: the session.
        path: the file (local path or URI).
        spec: columns, validator and key.

    Returns:
        A :class:`SourceRead`: ``accepted`` has the ``spec.output`` columns (strings) plus
        ``_row``, the record's number in the file (the header is record 1; it is the line
        number unless an earlier record spans lines or a blank line comes before it);
        ``rejected`` has ``source``, ``row``, ``record`` (the raw text of a malformed record,
        else its fields as a CSV line), ``reason``; ``report`` holds the counts, from one
        aggregate. The parsed records are persisted (``release`` unpersists them).

    Raises:
        SourceError: the file is missing or empty, or its header lacks a required column.
    """
    header = read_header(path)
    if not header:
        first = spark.read.text(path).limit(1).collect()
        if not first:
            raise SourceError(f"{path}: file is empty (no header line)")
        header = next(csv.reader(io.StringIO(first[0]["value"])))
    missing = [c for c in spec.columns if c not in header]
    if missing:
        raise SourceError(f"{path}: missing required column(s) {missing}; header has {header}")

    fields = StructType(
        [StructField(name, StringType()) for name in field_names(header)] + [StructField(CORRUPT, StringType())]
    )
    records = spark.read.options(
        header=True, multiLine=True, mode="PERMISSIVE", columnNameOfCorruptRecord=CORRUPT, escape='"',
        encoding="UTF-8",
    ).schema(fields).csv(path)
    if records.rdd.getNumPartitions() != 1:  # multiLine files are not split; numbering relies on it
        raise RuntimeError(f"{path}: expected one task to read the file in order")
    # one partition: monotonically_increasing_id is the record's index in the file
    numbered = records.withColumn(ROW, F.monotonically_increasing_id() + 2)
    parallelism = spark.sparkContext.defaultParallelism
    if parallelism > 1:
        numbered = numbered.repartition(parallelism)
    schema = StructType(
        [StructField(c, StringType()) for c in spec.output]
        + [StructField(REASON, StringType()), StructField(ROW, LongType()), StructField(RECORD, StringType())]
    )
    parsed = numbered.mapInPandas(_parse_records(header, spec), schema)  # type: ignore[arg-type]
    if spec.key:
        first_seen = F.min(ROW).over(Window.partitionBy(*spec.key))
        parsed = parsed.withColumn(
            REASON,
            F.when(F.col(REASON).isNotNull(), F.col(REASON)).when(
                F.col(ROW) != first_seen,
                F.concat(
                    F.lit(f"duplicate {', '.join(spec.key)} (first at row "),
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
    counts = first_row(parsed.agg(
        F.count(F.when(F.col(REASON).isNull(), 1)).alias("accepted"),
        F.count(REASON).alias("quarantined"),
    ))
    total = records.count()  # counted by Spark's reader on its own, not from the parse
    report = FileReport(
        source=path, input=total, accepted=int(counts["accepted"]), quarantined=int(counts["quarantined"])
    )
    logger.info(
        "read %s: %d rows, %d accepted, %d quarantined", path, total, report.accepted, report.quarantined
    )
    if not report.balanced:
        parsed.unpersist()
        raise RuntimeError(f"{path}: {total} input rows but {report.accepted} accepted + "
                           f"{report.quarantined} quarantined; records were lost while parsing")
    return SourceRead(accepted, rejected, report, [parsed])
