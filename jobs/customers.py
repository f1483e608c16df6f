"""spark-submit entry point: the customers stage. `spark-submit ... jobs/customers.py --conf conf/cluster.yaml`."""

from __future__ import annotations

import sys

from recsys.cli import stage_job
from recsys.stages.customers import run


def main(argv: list[str] | None = None) -> int:
    """Run the customers stage (:func:`recsys.stages.customers.run`) with ``--conf``, ``--set``, ``--run-date`` from ``argv``; return the exit code."""
    return stage_job(run, argv)


if __name__ == "__main__":
    sys.exit(main())
