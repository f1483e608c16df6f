"""The metadata one-hot vocabulary: cosines are the weighted share of agreeing columns, and new
labels take spare slots without moving any other vector or changing the model_id."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys.encoders.metadata import SPARE_MIN, Vocabulary, slots_for

COLUMNS = ("category", "colour")
WEIGHTS = {"category": 3.0, "colour": 1.0}


def frame(rows: list[tuple[str | None, str | None]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(COLUMNS))


def test_cosine_is_the_weighted_share_of_agreeing_columns() -> None:
    vocabulary = Vocabulary.new(COLUMNS, WEIGHTS, {"category": {"dress", "top"}, "colour": {"red", "blue"}})
    assert vocabulary.dim == slots_for(2) * 2 == (2 + SPARE_MIN) * 2
    v = vocabulary.encode(frame([("dress", "red"), ("dress", "blue"), ("top", "red"), (None, None), ("coat", "red")]))
    assert v.dtype == np.float32 and v.shape == (5, vocabulary.dim)
    assert np.allclose(np.linalg.norm(v[:3], axis=1), 1.0)
    assert v[0] @ v[1] == pytest.approx(3 / 4) and v[0] @ v[2] == pytest.approx(1 / 4) and v[1] @ v[2] == 0
    assert not v[3].any()  # nothing known: the zero vector, not NaN
    red = slots_for(2) + 1  # colour's slots follow category's; "red" is its second label (sorted)
    assert np.array_equal(v[4], np.eye(vocabulary.dim, dtype=np.float32)[red])  # an unknown category: colour only


def test_new_labels_take_spare_slots_and_keep_the_model_and_every_other_vector() -> None:
    day_n = Vocabulary.new(COLUMNS, WEIGHTS, {"category": {"dress", "top"}, "colour": {"red"}})
    rows = frame([("dress", "red"), ("top", "red")])
    assert day_n.extended({"category": {"top", "dress"}, "colour": {"red"}}) is day_n  # nothing new: itself
    day_n1 = day_n.extended({"category": {"dress", "blazer"}, "colour": {"red", "green"}})
    assert day_n1 is not None and day_n1.model_id == day_n.model_id and day_n1.dim == day_n.dim
    assert day_n1.labels == {"category": ("dress", "top", "blazer"), "colour": ("red", "green")}  # appended
    assert np.array_equal(day_n1.encode(rows), day_n.encode(rows))
    new = day_n1.encode(frame([("blazer", "green")]))[0]
    assert new @ day_n1.encode(rows)[0] == 0 and np.linalg.norm(new) == pytest.approx(1.0)
    assert Vocabulary.from_json(day_n1.to_json()) == day_n1

    # a column outgrowing its slots needs a new vocabulary, with a new model id
    many = {"category": {f"c{i}" for i in range(slots_for(2) + 1)}, "colour": {"red"}}
    assert day_n.extended(many) is None
    assert Vocabulary.new(COLUMNS, WEIGHTS, many).model_id != day_n.model_id
    # the same slot counts with other labels: another layout, so another model id
    other = Vocabulary.new(COLUMNS, WEIGHTS, {"category": {"coat", "shirt"}, "colour": {"blue"}})
    assert other.slots == day_n.slots and other.model_id != day_n.model_id
    assert Vocabulary.new(COLUMNS, {"category": 1.0, "colour": 1.0}, many).model_id != Vocabulary.new(
        COLUMNS, WEIGHTS, many).model_id
    assert day_n.matches(COLUMNS, WEIGHTS) and not day_n.matches(("category",), {"category": 3.0})
    with pytest.raises(ValueError, match="not a metadata vocabulary"):
        Vocabulary.from_json('{"columns": ["a"], "labels": {"a": []}}')
