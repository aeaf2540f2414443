"""The demo path end to end, as `make demo` runs it, on a small gallery with the default model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import assert_no_process_left, free_port

pytestmark = pytest.mark.e2e
LIMIT = 500


def test_demo_ingests_searches_evaluates_and_cleans_up(tmp_path: Path) -> None:
    data_dir = tmp_path / "imagine-data"
    env = {
        **os.environ,
        "IMAGINE_DATA_DIR": str(data_dir),
        "IMAGINE_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
    }
    env.pop("IMAGINE_MODEL", None)  # the committed default checkpoint
    res = subprocess.run(
        [sys.executable, "-m", "imagine.cli", "demo", "--limit", str(LIMIT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = res.stdout
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "first run: job" in out and f"{LIMIT} embedded, 0 skipped" in out
    assert f"0 embedded, {LIMIT} skipped (unchanged), 0 failed" in out
    assert out.count(f"collection holds {LIMIT} points") == 2
    assert "'a photo of a sneaker'" in out and "1. " in out
    # the default models include the generative path: text-only and fused side by side
    assert "text-only | fused" in out
    # the default aggregator is mean pooling: the attention column is not faked from it, the
    # server refuses the attention path (FAILED_PRECONDITION) and the demo says why
    assert re.search(r"^class\s+text\s+generated \(mean\)\s+fused$", out, re.M), out[-3000:]
    assert re.search(
        r"^    not run: generated \(attention\): aggregator fmnist-aggregator-\S+ is mean pooling",
        out,
        re.M,
    ), out[-3000:]
    map_row = re.search(r"^mAP\s+([0-9.]+)", out, re.M)  # the first column is the text path
    p10_row = re.search(r"^P@10\s+([0-9.]+)", out, re.M)
    assert map_row and p10_row, out[-2000:]
    map_, p10 = float(map_row.group(1)), float(p10_row.group(1))
    assert map_ > 0.7 and p10 > 0.7, (map_, p10)
    assert (data_dir / "demo" / "contact_sheet.png").stat().st_size > 10_000
    report = json.loads((data_dir / "demo" / "eval.json").read_text())
    assert set(report["paths"]) == {"text", "generated (mean)", "fused"}
    assert set(report["not_run"]) == {"generated (attention)"}
    assert (data_dir / "demo" / "eval.png").stat().st_size > 5_000
    assert_no_process_left(str(data_dir))
