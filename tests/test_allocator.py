"""recipes/train.py re-runs itself once on tcmalloc (sft_hf/speed/allocator.py): same PID, command line and exit code; the
opt-out and a chosen library are honoured; a missing library is a clear error."""
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sft_hf.speed import allocator

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import os, sys
from sft_hf.speed import allocator
print("before", os.getpid(), flush=True)
allocator.use_fast_allocator()
print("after", os.getpid(), allocator.active_allocator(), sys.argv[1:], flush=True)
import pyarrow
print("arrow", os.getpid(), pyarrow.default_memory_pool().backend_name, flush=True)
sys.exit(3)
"""
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD: Linux")


def run_script(script: str, *args: str, **env_overrides) -> subprocess.CompletedProcess:
    """`script` in a fresh interpreter whose environment chose no allocator and no Arrow pool, unless given here."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.CHOICE, allocator.ARROW_POOL)}
    env.update(PYTHONPATH=str(ROOT), **env_overrides)
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120)


def run_probe(**env_overrides) -> tuple[int, list[list[str]]]:
    result = run_script(PROBE, "--flag", "a b", **env_overrides)
    return result.returncode, [line.split(" ", 2) for line in result.stdout.splitlines()]


def a_preloadable_library() -> str:
    """A real shared library that is harmless to preload (libm, part of glibc), resolved to a file."""
    soname = ctypes.util.find_library("m")
    for folder in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/lib64", "/lib"):
        if soname and os.path.isfile(os.path.join(folder, soname)):
            return os.path.join(folder, soname)
    pytest.skip("no libm file found to preload")


def test_reexec_once_keeping_pid_argv_and_exit_code():
    library = a_preloadable_library()
    code, lines = run_probe(SFT_HF_ALLOCATOR=library)
    assert code == 3
    # the first run prints "before" and execs; the re-run prints "before" again, sees the preload and goes on
    assert [line[0] for line in lines] == ["before", "before", "after", "arrow"]
    assert len({line[1] for line in lines}) == 1  # exec, not a child: launchers keep supervising the same process
    assert lines[-2][2] == f"{library} ['--flag', 'a b']"  # loaded (it is in /proc/self/maps), arguments intact
    assert lines[-1][2] == "system"  # Arrow allocates through the preloaded malloc too


def test_a_users_arrow_pool_is_kept():
    code, lines = run_probe(SFT_HF_ALLOCATOR=a_preloadable_library(), ARROW_DEFAULT_MEMORY_POOL="jemalloc")
    assert code == 3 and [line[0] for line in lines] == ["before", "before", "after", "arrow"]
    assert lines[-1][2] in ("jemalloc", "mimalloc")  # Arrow's own choice when this build lacks jemalloc


def test_opt_out_keeps_the_system_malloc():
    code, lines = run_probe(SFT_HF_ALLOCATOR="system")
    assert code == 3
    assert [line[0] for line in lines] == ["before", "after", "arrow"]
    assert lines[-2][2] == "the system malloc ['--flag', 'a b']"


def test_a_chosen_library_that_does_not_exist_is_named(monkeypatch):
    monkeypatch.setenv(allocator.CHOICE, "/nowhere/libtcmalloc.so")
    with pytest.raises(FileNotFoundError, match="SFT_HF_ALLOCATOR=/nowhere/libtcmalloc.so"):
        allocator.fast_allocator_library()


@pytest.mark.skipif(not any(ctypes.util.find_library(n) for n in ("tcmalloc_minimal", "tcmalloc")),
                    reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
def test_tcmalloc_is_found_and_preloaded_by_default():
    code, lines = run_probe()
    assert code == 3 and [line[0] for line in lines] == ["before", "before", "after", "arrow"]
    assert "tcmalloc" in lines[-2][2] and lines[-1][2] == "system"


RELEASE_PROBE = """
import gc, sys
from sft_hf.speed import allocator
allocator.use_fast_allocator()
def anon_mb():
    status = open("/proc/self/status").read()
    return int(status.split("RssAnon:")[1].split()[0]) // 1024
start = anon_mb()
objects = [bytes(600 + k % 200) for k in range(400_000)]  # blocks above pymalloc's 512 bytes: malloc's
del objects
gc.collect()
freed = anon_mb()
allocator.release_free_memory()
print(allocator.active_allocator(), start, freed, anon_mb())
"""


@pytest.mark.parametrize("choice", ["system", ""])
def test_release_free_memory_gives_freed_blocks_back(choice):
    """What a large read freed goes back to the system before map workers fork (sft_hf/data.py fork_friendly):
    both tcmalloc and glibc keep ~200 MB of freed small blocks otherwise."""
    result = run_script(RELEASE_PROBE, **({allocator.CHOICE: choice} if choice else {}))
    assert result.returncode == 0, result.stderr
    library, start, freed, released = result.stdout.split()[-4:]
    if not choice and "tcmalloc" not in library:
        pytest.skip("tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
    start, freed, released = int(start), int(freed), int(released)
    assert freed - start > 150, (library, start, freed)  # kept by malloc after the objects were freed
    assert released - start < (freed - start) / 4, (library, start, freed, released)  # 290 → 14 and 318 → 24 MB here
