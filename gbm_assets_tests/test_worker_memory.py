"""Cell-finding workers keep their freed image-sized buffers (imaging.worker_memory)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from gbm_assets.imaging.worker_memory import keep_freed_memory

REPO = Path(__file__).resolve().parents[1]
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
# Six 1-megapixel float32 temporaries made and freed together, image after image: the minor page
# faults of ten such images after three to warm up.
_CYCLES = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from gbm_assets.imaging.worker_memory import keep_freed_memory
    assert keep_freed_memory()
def image():
    arrays = [np.ones((1024, 1024), np.float32) for _ in range(6)]
    return sum(float(a[0, 0]) for a in arrays)
for _ in range(3):
    image()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    image()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("GLIBC_TUNABLES", None)
    env["NUMPY_MADVISE_HUGEPAGE"] = "0"  # huge pages would absorb some faults, machine by machine
    done = subprocess.run([sys.executable, "-c", _CYCLES, mode], capture_output=True, text=True, env=env, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc settings")
def test_a_worker_that_keeps_freed_memory_does_not_fault_its_image_buffers_in_again():
    default, kept = _faults("default"), _faults("keep")
    assert default > 10_000  # 10 images x 6 arrays x 1,024 pages each, faulted in again (about 30,000)
    assert kept < default / 20


def test_keep_freed_memory_says_whether_it_could_and_the_pool_workers_call_it(monkeypatch):
    assert keep_freed_memory() is GLIBC  # (in this test process: harmless)
    from gbm_assets.imaging import plate_cells

    calls = []
    monkeypatch.setattr(plate_cells, "keep_freed_memory", lambda: calls.append("heap") or True)
    monkeypatch.setattr(plate_cells.cv2, "setNumThreads", lambda n: calls.append(("threads", n)))
    plate_cells._init_worker()
    assert calls == [("threads", 1), "heap"]
