"""Helpers shared by the benchmarks: data location and peak memory of this process tree."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


def hm_path() -> Path:
    """``../shared/data/hm``, or exit with the reason."""
    path = SHARED_DATA / "hm"
    if not (path / "articles.csv").is_file():
        raise SystemExit(f"skipped: H&M data not found at {path} (set RECSYS_SHARED_DATA)")
    return path


class PeakMemory:
    """Samples the resident memory of this process and all its children (the Spark JVM and
    Python workers) every ``interval`` seconds; ``peak_gib`` is the largest sum seen."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return self.peak / 2**30


def cold_and_warm_seconds(df: object) -> tuple[float, float]:
    """Seconds for two full evaluations of ``df`` (a Spark DataFrame, written to the ``noop``
    sink): the first includes starting Python workers and loading models, the second reuses them."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        df.write.format("noop").mode("overwrite").save()  # type: ignore[attr-defined]
        times.append(time.perf_counter() - t0)
    return times[0], times[1]


def resident_bytes() -> int:
    """Resident memory (RSS) of this process and all its children (Spark's JVM, Python workers)."""
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total
