"""The handwritten code stays lint-clean, formatted and type-checked (as `make lint` checks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_lint_and_format_are_clean() -> None:
    lint = run(str(BIN / "ruff"), "check", ".")
    assert lint.returncode == 0, lint.stdout
    fmt = run(str(BIN / "ruff"), "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout


def test_mypy_is_clean_on_handwritten_code() -> None:
    res = run(
        str(BIN / "mypy"), "imagine", "services", "workers", "trainer", "protos/codegen.py", "bench"
    )
    assert res.returncode == 0, res.stdout
