"""sft-hf: supervised instruction fine-tuning on the Hugging Face stack.

The names below load on first use (PEP 562), so `import sft_hf.speed.allocator` runs before torch is imported.
"""
import importlib

_EXPORTS = {
    "sft_hf.collator": ["IGNORE_INDEX", "InstructionDataCollator", "resolve_pad_token_id"],
    "sft_hf.run.config": ["DataArguments", "ModelArguments", "SFTArguments", "parse_recipe"],
    "sft_hf.data": ["DataError", "load_instruction_dataset", "split_dataset"],
    "sft_hf.evaluation.generation": ["generate_responses"],
    "sft_hf.evaluation.metrics": ["exact_match"],
    "sft_hf.modeling": ["load_model", "load_tokenizer"],
    "sft_hf.packing": ["pack_dataset"],
    "sft_hf.precision": ["plan_precision"],
    "sft_hf.templates": ["TEMPLATES", "Template", "TemplateError", "get_template"],
    "sft_hf.tokenization": ["tokenize_dataset"],
    "sft_hf.trainer": ["InstructionTrainer"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__version__ = "0.1.0"
__all__ = list(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'sft_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # once
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
