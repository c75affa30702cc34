"""sft-hf: supervised instruction fine-tuning on the Hugging Face stack."""
from sft_hf.collator import IGNORE_INDEX, InstructionDataCollator, resolve_pad_token_id
from sft_hf.config import DataArguments, ModelArguments, SFTArguments, parse_recipe
from sft_hf.data import DataError, load_instruction_dataset, split_dataset
from sft_hf.generation import exact_match, generate_responses
from sft_hf.modeling import load_model, load_tokenizer
from sft_hf.templates import TEMPLATES, Template, TemplateError, get_template
from sft_hf.tokenization import tokenize_dataset
from sft_hf.trainer import InstructionTrainer

__version__ = "0.1.0"
__all__ = [
    "IGNORE_INDEX", "InstructionDataCollator", "resolve_pad_token_id", "DataArguments", "ModelArguments",
    "SFTArguments", "parse_recipe", "DataError", "load_instruction_dataset", "split_dataset", "exact_match",
    "generate_responses", "load_model", "load_tokenizer", "TEMPLATES", "Template", "TemplateError", "get_template",
    "tokenize_dataset", "InstructionTrainer",
]
