"""spark-submit entry point: the train stage. `spark-submit ... jobs/train.py --conf conf/cluster.yaml`."""

from __future__ import annotations

import sys

from recsys.cli import stage_job
from recsys.stages.train import run


def main(argv: list[str] | None = None) -> int:
    """Run the train stage (:func:`recsys.stages.train.run`) with ``--conf``, ``--set``, ``--run-date`` from ``argv``; return the exit code."""
    return stage_job(run, argv)


if __name__ == "__main__":
    sys.exit(main())
