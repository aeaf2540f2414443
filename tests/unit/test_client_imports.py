"""The client side (Python client, CLI) must not import the server stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "celery")


@pytest.mark.parametrize("module", ["imagine.client", "imagine.cli"])
def test_client_side_import_does_not_pull_in_the_server_stack(module: str) -> None:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing {module} also imported {loaded}"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["train", "--stage", "generator", "--help"], "usage: imagine train"),
        (["worker", "--concurrency", "1", "--help"], "Start worker instance"),
    ],
)
def test_train_and_worker_take_their_own_options(args: list[str], words: str) -> None:
    """The README's ``imagine train --stage ...`` and ``imagine worker <celery options>``: the
    options reach the trainer's and Celery's parsers instead of being rejected by ours."""
    proc = subprocess.run(
        [sys.executable, "-m", "imagine.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert words in proc.stdout
    assert "unrecognized arguments" not in proc.stderr
