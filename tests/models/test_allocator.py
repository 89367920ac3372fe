"""glibc malloc tuning (models/allocator.py): freed activations are reused, not faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Allocate and free a 64 MB tensor (over glibc's largest mmap threshold) 24 times, on a thread
# other than the main one as the service's inference thread does; count minor page faults.
PROBE = """
import json, resource, threading
from models.allocator import tune_malloc
applied = tune_malloc()
assert tune_malloc() == applied  # once per process
import torch
faults = []
def work():
    for _ in range(24):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        t = torch.ones(16 * 1024 * 1024)  # 64 MB, every page touched
        del t
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(tuning: str) -> dict:
    env = {**os.environ, "GNWS_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
                    reason="the settings are glibc mallopt calls")
def test_tuned_processes_reuse_freed_memory_instead_of_faulting_it_in_again() -> None:
    default = _probe("0")
    tuned = _probe("1")
    assert default["applied"] is False
    assert tuned["applied"] is True
    pages = 64 * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")
    # glibc's default: every allocation is a fresh mmap whose pages fault in again
    assert min(default["faults"][12:]) > pages // 4, default
    # tuned: the heap grows for the first few (measured: up to 8, while fragments settle), then the
    # freed memory is reused with no new faults
    assert max(tuned["faults"][12:]) == 0, tuned
