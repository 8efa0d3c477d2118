"""``sadt_jax.main.keep_freed_memory``: freed blocks are reused without new page faults."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
import numpy as np
from sadt_jax.main import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults_of_one_allocation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_allocation()
print(min(faults_of_one_allocation() for _ in range(3)))
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc mallopt")
def test_keep_freed_memory_reuses_large_blocks():
    def faults(mode):
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout.split()[-1])

    # glibc's default serves a 64 MiB block by mmap and unmaps it on free, so every
    # allocation faults its pages in again (fewer faults with transparent huge pages);
    # kept, the next allocation reuses the heap's pages.
    default, keep = faults("default"), faults("keep")
    assert default > 0
    assert 10 * keep <= default, (keep, default)


def test_keep_freed_memory_warns_when_jax_already_started():
    script = (
        "import jax.numpy as jnp; from sadt_jax.main import keep_freed_memory; "
        "jnp.zeros(1).block_until_ready(); keep_freed_memory()"
    )
    late = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert late.returncode == 0 and "after a JAX backend started" in late.stderr, late.stderr
    early = subprocess.run(
        [sys.executable, "-c", "from sadt_jax.main import keep_freed_memory; keep_freed_memory()"],
        capture_output=True,
        text=True,
    )
    assert early.returncode == 0 and "after a JAX backend started" not in early.stderr
