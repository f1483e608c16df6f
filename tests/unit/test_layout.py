"""The house: one module per stage, one hop from job to stage, light commands without torch."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from recsys.stages import STAGES, stage_function
from tests.conftest import REPO


@pytest.mark.parametrize("stage", STAGES)
def test_each_job_calls_its_stage_run_and_nothing_else(stage: str) -> None:
    tree = ast.parse((REPO / "jobs" / f"{stage}.py").read_text())
    imports = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for alias in node.names}
    assert (f"recsys.stages.{stage}", "run") in imports
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    calls = [ast.unparse(node.func) for node in ast.walk(main) if isinstance(node, ast.Call)]
    assert calls == ["stage_job"], calls
    assert stage_function(stage).__module__ == f"recsys.stages.{stage}"


def test_stage_job_refuses_a_function_that_is_not_a_stage() -> None:
    from recsys.cli import stage_job

    with pytest.raises(ValueError, match="is not a stage's run function"):
        stage_job(test_stage_job_refuses_a_function_that_is_not_a_stage, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown stage 'serve'"):
        stage_function("serve")


def test_light_commands_do_not_import_torch() -> None:
    """What ``recsys sql``, ``similar``, ``metrics`` and ``export-submission`` import (the CLI, the
    pipeline's run bookkeeping, tables, session, the customers library) loads neither torch nor
    transformers."""
    code = (
        "import sys\n"
        "import recsys.cli, recsys.pipeline, recsys.stages, recsys.tables, recsys.session, recsys.customers\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
