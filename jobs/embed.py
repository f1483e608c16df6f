"""spark-submit entry point: the embed stage. `spark-submit ... jobs/embed.py --conf conf/cluster.yaml`."""

from __future__ import annotations

import sys

from recsys.cli import stage_job
from recsys.stages.embed import run


def main(argv: list[str] | None = None) -> int:
    """Run the embed stage (:func:`recsys.stages.embed.run`) with ``--conf``, ``--set``, ``--run-date`` from ``argv``; return the exit code."""
    return stage_job(run, argv)


if __name__ == "__main__":
    sys.exit(main())
