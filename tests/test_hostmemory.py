"""The host allocator setting: applied once on glibc, skipped on request, and it keeps big freed blocks."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

GLIBC = platform.libc_ver()[0] == "glibc"

# A fresh interpreter: allocate and free a 64 MB block twenty times, count the page faults it took. With the system
# malloc each allocation is a new mapping faulted in page by page; kept, the second and later ones reuse the pages.
PROBE = """
import resource, sys
from dedn.hostmemory import keep_freed_host_memory
applied = keep_freed_host_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = faults()
for _ in range(20):
    block = bytearray(64 << 20)
    del block
print(applied, faults() - start)
"""


def _probe(env: dict[str, str]) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**env, "PYTHONPATH": ":".join(sys.path)}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only; other C libraries keep their own behaviour")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    applied, kept = _probe({})
    skipped, system = _probe({"DEDN_SYSTEM_MALLOC": "1"})
    assert applied and not skipped
    pages = (64 << 20) // 4096
    assert system > 15 * pages  # every allocation faulted in again
    assert kept < 3 * pages     # the first one only


def test_the_setting_is_applied_once_and_reported() -> None:
    from dedn.hostmemory import keep_freed_host_memory

    assert keep_freed_host_memory() is keep_freed_host_memory() is GLIBC
