"""Process runtime settings: glibc keeps freed memory for the next large batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from imagine.runtime import uses_glibc

# A model pass's activations: blocks of several MiB, all live at once, freed at the end of the
# pass, then the same again. Prints the minor page faults of each pass.
_PASSES = """
import json, resource, sys
import numpy as np
from imagine.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = [np.ones(mib << 17) for mib in (12, 6, 3, 12, 8)]  # float64: MiB, written
    del live
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""

glibc = pytest.mark.skipif(not uses_glibc(), reason="glibc's malloc only")


def _faults_per_pass(mode: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", _PASSES, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@glibc
def test_later_passes_reuse_the_memory_of_earlier_ones() -> None:
    # 41 MiB of blocks is ~10,500 pages: by default glibc returns most of them to the kernel
    # when freed (blocks above its mmap threshold, and the heap's trimmed top), and the next
    # pass faults them in again
    default = _faults_per_pass("default")
    assert sum(default[3:]) > 10_000, default
    kept = _faults_per_pass("keep")
    assert max(kept[3:]) < 100, kept
