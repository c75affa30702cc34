"""tests/gpu: the GPU paths, run on a machine with CUDA GPUs (docs/scale.md says which have run). Without CUDA every
test here is skipped at collection, so `python -m pytest -q` collects this folder everywhere and runs it only there."""
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here: tests/gpu runs on a GPU machine (docs/scale.md)")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)
