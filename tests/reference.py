"""Brute-force references the tests compare the pipeline with: plain Python, numpy and
scikit-learn on the same data, sharing no code with the Spark implementations they check."""

from __future__ import annotations

import csv
import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


def read_purchases(path: Path) -> list[tuple[dt.date, str, str]]:
    """``(t_dat, customer_id, article_id)`` of an H&M ``transactions_train.csv``."""
    with open(path, encoding="utf-8", newline="") as handle:
        return [(dt.date.fromisoformat(r["t_dat"]), r["customer_id"], r["article_id"]) for r in csv.DictReader(handle)]


def split_by_days(purchases: Sequence[tuple[dt.date, str, str]], days: int) -> tuple[list, list]:
    """``(train, validation)``: the last ``days`` dates against the rest."""
    last = max(t for t, _, _ in purchases)
    first = last - dt.timedelta(days=days - 1)
    return [p for p in purchases if p[0] < first], [p for p in purchases if p[0] >= first]


def popular_list(purchases: Sequence[tuple[dt.date, str, str]], catalogue: Iterable[str], k: int, days: int) -> list[str]:
    """The ``k`` most bought articles of the last ``days`` days (ties: more purchases overall,
    then article_id), filled up with the catalogue's other articles by id."""
    last = max(t for t, _, _ in purchases)
    recent = Counter(a for t, _, a in purchases if t > last - dt.timedelta(days=days))
    total = Counter(a for _, _, a in purchases)
    return sorted(set(catalogue), key=lambda a: (-recent[a], -total[a], a))[:k]


def average_precision(bought: set[str], predicted: Sequence[str], k: int) -> float:
    """AP@k as the H&M competition scores it (Kaggle, "H&M Personalized Fashion Recommendations",
    Evaluation): ``1/min(m, k) Σ P(i) rel(i)``, a repeated prediction counted once."""
    hits, total, seen = 0, 0.0, set()
    for i, article in enumerate(predicted[:k], start=1):
        if article in bought and article not in seen:
            hits += 1
            total += hits / i
        seen.add(article)
    return total / min(len(bought), k)


def mean_average_precision(lists: dict[str, Sequence[str]] | Sequence[str],
                           validation: Sequence[tuple[dt.date, str, str]], k: int) -> float:
    """MAP@k over the customers who bought in ``validation``; ``lists`` per customer, or one
    list for everyone."""
    bought: dict[str, set[str]] = defaultdict(set)
    for _, customer, article in validation:
        bought[customer].add(article)
    scores = [average_precision(items, lists if isinstance(lists, Sequence) else lists.get(c, []), k)
              for c, items in bought.items()]
    return float(np.mean(scores))


def copurchase_pairs(purchases: Sequence[tuple[dt.date, str, str]], days: int) -> set[tuple[str, str, str]]:
    """``(customer, a, b)``: different articles one customer bought at most ``days`` apart, b not before a."""
    by_customer: dict[str, list[tuple[dt.date, str]]] = defaultdict(list)
    for t, customer, article in purchases:
        by_customer[customer].append((t, article))
    pairs = set()
    for customer, bought in by_customer.items():
        for t_a, a in bought:
            for t_b, b in bought:
                if a != b and t_a <= t_b <= t_a + dt.timedelta(days=days):
                    pairs.add((customer, a, b))
    return pairs


def bought_together(purchases: Sequence[tuple[dt.date, str, str]], days: int, k: int) -> dict[str, list[str]]:
    """The "bought together" lists: for each article, the ``k`` articles most customers bought at
    most ``days`` apart from it (either order); ties by article_id."""
    by_customer: dict[str, list[tuple[dt.date, str]]] = defaultdict(list)
    for t, customer, article in purchases:
        by_customer[customer].append((t, article))
    counts: Counter[tuple[str, str]] = Counter()
    for bought in by_customer.values():
        together = {(a, b) for t_a, a in bought for t_b, b in bought
                    if a != b and abs((t_b - t_a).days) <= days}
        counts.update(together)
    lists: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for (a, b), n in counts.items():
        lists[a].append((-n, b))
    return {a: [b for _, b in sorted(pairs)[:k]] for a, pairs in lists.items()}


def list_metrics(lists: dict[str, list[str]], categories: dict[str, str | None],
                 pairs: set[tuple[str, str, str]]) -> tuple[float, float]:
    """``(category precision, co-purchase hit rate)`` of item lists: the share of (article,
    neighbour) pairs with the same category (both known), and the share of ``pairs`` whose
    second article is in the first's list."""
    same = [categories[a] == categories[n] for a, ns in lists.items() for n in ns
            if categories.get(a) is not None and categories.get(n) is not None]
    hits = [b in lists.get(a, ()) for _, a, b in pairs]
    return float(np.mean(same)), float(np.mean(hits)) if hits else float("nan")


def classifier_scores(checkpoint: str, images: Sequence[bytes], labels: Sequence[int],
                      max_pixels: int = 50_000_000) -> tuple[float, float, int]:
    """``(accuracy, macro-F1, images scored)`` of a train-stage checkpoint's own classifier on
    ``images`` (undecodable ones are left out, as the train stage does), scored by scikit-learn."""
    import torch
    from sklearn.metrics import accuracy_score, f1_score

    from recsys.encoders.image import ImageDecodeError, build_classifier, decode_image, read_checkpoint, to_tensor

    state = read_checkpoint(checkpoint)
    model = build_classifier(state["arch"], len(state["classes"]), state["height"])
    model.load_state_dict(state["state_dict"])
    model = model.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    decoded, truth = [], []
    for data, label in zip(images, labels):
        try:
            decoded.append(decode_image(data, state["height"], state["width"], max_pixels))
            truth.append(label)
        except ImageDecodeError:
            continue
    with torch.inference_mode():
        logits = model(to_tensor(np.stack(decoded), "cpu", channels_last=True))
    predicted = logits.argmax(1).numpy()
    return float(accuracy_score(truth, predicted)), float(f1_score(truth, predicted, average="macro")), len(truth)
