"""The metadata encoder: an append-only one-hot vocabulary per categorical column (no Spark).

A column's labels keep their slot for the life of the vocabulary; labels first seen later are
appended to the column's spare slots. So a day that brings a new category value encodes its
articles without moving any other article's vector, and the vectors' ``model_id`` (fixed when
the vocabulary is built, from its columns, weights, slots and first labels) stays the one the
saved LSH index was fitted for. Only when a column outgrows its slots is a new vocabulary, with a new ``model_id``,
built (and every metadata vector, list and index with it).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

SPARE_SHARE = 0.25  # a new vocabulary leaves this share of each column's labels free, at least SPARE_MIN slots
SPARE_MIN = 8


def slots_for(labels: int) -> int:
    """Slots of a new column with ``labels`` labels: ``labels + max(SPARE_MIN, ceil(SPARE_SHARE * labels))``."""
    return labels + max(SPARE_MIN, math.ceil(SPARE_SHARE * labels))


@dataclass(frozen=True)
class Vocabulary:
    """Labels and slots per column of the metadata one-hot vector.

    Column ``c`` occupies ``slots[c]`` consecutive dimensions (columns in ``columns`` order); its
    ``i``-th label is dimension ``offset(c) + i``, with value ``sqrt(weights[c])`` before the
    vector is L2-normalised, so that the cosine of two articles is the weighted share of columns
    on which they agree. A missing value (null) or a label not in the vocabulary is the all-zero
    part. Unused slots are always zero and change no cosine.
    """

    columns: tuple[str, ...]
    weights: Mapping[str, float]
    slots: Mapping[str, int]
    labels: Mapping[str, tuple[str, ...]]
    model_id: str  # onehot@<sha256 of columns, weights, slots and the labels it was built with>: appending keeps it

    @property
    def dim(self) -> int:
        """Vector length: the sum of the columns' slots."""
        return int(sum(self.slots[c] for c in self.columns))

    @classmethod
    def new(cls, columns: tuple[str, ...], weights: Mapping[str, float],
            seen: Mapping[str, set[str]]) -> Vocabulary:
        """A vocabulary for ``seen`` labels per column (sorted), with spare slots (:func:`slots_for`)."""
        labels = {c: tuple(sorted(seen.get(c, set()))) for c in columns}
        slots = {c: slots_for(len(labels[c])) for c in columns}
        recipe = json.dumps({"columns": list(columns), "weights": dict(weights), "slots": slots,
                             "labels": {c: list(v) for c, v in labels.items()}}, sort_keys=True)
        model_id = "onehot@" + hashlib.sha256(recipe.encode()).hexdigest()[:12]
        return cls(columns, dict(weights), slots, labels, model_id)

    def matches(self, columns: tuple[str, ...], weights: Mapping[str, float]) -> bool:
        """Whether this vocabulary encodes exactly these columns with these weights."""
        return self.columns == tuple(columns) and dict(self.weights) == dict(weights)

    def extended(self, seen: Mapping[str, set[str]]) -> Vocabulary | None:
        """This vocabulary with the labels of ``seen`` it lacks appended (sorted) per column;
        itself when nothing is new; None when a column would outgrow its slots (build a
        :meth:`new` one then)."""
        labels = {}
        for c in self.columns:
            known = set(self.labels[c])
            added = sorted(seen.get(c, set()) - known)
            if len(self.labels[c]) + len(added) > self.slots[c]:
                return None
            labels[c] = (*self.labels[c], *added)
        if all(labels[c] == tuple(self.labels[c]) for c in self.columns):
            return self
        return Vocabulary(self.columns, self.weights, self.slots, labels, self.model_id)

    def encode(self, frame: pd.DataFrame) -> npt.NDArray[np.float32]:
        """One unit vector per row of ``frame`` (one string column per vocabulary column).

        Returns:
            float32 ``(len(frame), dim)``; a row with no known label in any column is all zero.

        Raises:
            KeyError: ``frame`` lacks one of the columns.
        """
        out = np.zeros((len(frame), self.dim), dtype=np.float32)
        rows = np.arange(len(frame))
        offset = 0
        for c in self.columns:
            index = {label: offset + i for i, label in enumerate(self.labels[c])}
            slot = frame[c].map(index).to_numpy(dtype=np.float64, na_value=np.nan)
            known = ~np.isnan(slot)
            out[rows[known], slot[known].astype(np.int64)] = np.float32(math.sqrt(self.weights[c]))
            offset += self.slots[c]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=out, where=norms > 0)

    def to_json(self) -> str:
        return json.dumps({"columns": list(self.columns), "weights": dict(self.weights), "slots": dict(self.slots),
                           "labels": {c: list(v) for c, v in self.labels.items()}, "model_id": self.model_id},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        """The vocabulary :meth:`to_json` wrote.

        Raises:
            ValueError: ``text`` is not such a recipe.
        """
        try:
            raw = json.loads(text)
            columns = tuple(raw["columns"])
            return cls(columns, {c: float(raw["weights"][c]) for c in columns},
                       {c: int(raw["slots"][c]) for c in columns}, {c: tuple(raw["labels"][c]) for c in columns},
                       str(raw["model_id"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a metadata vocabulary: {text[:200]!r} ({err})") from err
