"""The on-disk cache of built assets (`$SFT_HF_CACHE`, else ~/.cache/sft_hf): the toy model and data, chapter 7's
chat set, GGUF conversions, benchmark workloads. Each entry is written whole or not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("SFT_HF_CACHE", Path.home() / ".cache" / "sft_hf"))


def atomic_write_dir(target: Path, write) -> Path:
    """Build into a temp dir beside `target`, then rename: a crash never leaves a half-written cache entry."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
