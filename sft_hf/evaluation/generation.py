"""Greedy generation for held-out instructions (one process or sharded under `accelerate launch`), and exact match."""
from __future__ import annotations

import contextlib
import logging
import os

import torch
from tqdm.auto import tqdm

from sft_hf.templates import ChatTemplate, Template, get_template
from sft_hf.tokenization import left_cut_positions

logger = logging.getLogger(__name__)


def extract_response(text: str, prompt: str = "", template: str | Template = "alpaca") -> str:
    """Chapter 7's extraction: drop the prompt the text starts with, then the response header, then whitespace.

    Chapter 7 decodes prompt + generation and cuts `len(input_text)` characters; here only new tokens are
    decoded, so this mostly strips a response header the model wrote again (e.g. a leading "### Response:").
    """
    if prompt and text.startswith(prompt):
        text = text[len(prompt) :]
    header = get_template(template).response.strip()
    text = text.strip()
    if header and text.startswith(header):
        text = text[len(header) :]
    return text.strip()


@torch.no_grad()
def generate_responses(
    model, tokenizer, records: list[dict], template: str | Template = "alpaca", max_new_tokens: int = 256,
    batch_size: int | None = None, show_progress: bool = True, distributed: bool = False,
) -> list[str]:
    """Greedy responses, prompt removed (only new tokens are decoded), stopped at EOS, response header stripped.
    `batch_size` rows are generated at once; None chooses it by memory (`default_batch_size`).

    With `distributed=True` (under `accelerate launch`) every process generates for its share of the records and
    all processes return the full list in record order; every process must call it then.

    With weights sharded over the processes (FSDP, ZeRO-3: `weights_sharded`) every forward pass needs all of them,
    so every process must call it, and they run in lock step: padded batches only (continuous batching runs its
    forward passes in a thread of its own, out of step), `synced_gpus` (a process whose answers have ended keeps
    running forward passes until every process's have), and the same number of `generate` calls on each (shares of
    equal size, the last one padded with a repeated record, and one batch size: the user's, or the smallest any
    process chose).
    """
    template = get_template(template)
    if not records:
        return []
    synced = in_lock_step(model)
    indices = list(range(len(records)))
    if distributed:
        from accelerate import PartialState
        from accelerate.utils import gather_object

        state = PartialState(cpu=distributed_on_cpu())
        with state.split_between_processes(indices, apply_padding=True) as shard:
            mine = _generate(model, tokenizer, [records[i] for i in shard], template, max_new_tokens, batch_size,
                             show_progress and state.is_main_process, synced)
            pairs = gather_object(list(zip(shard, mine)))  # concatenated in process order
        out = [None] * len(records)
        for i, response in pairs:  # a padded repeat writes the same response again
            out[i] = response
        return out
    return _generate(model, tokenizer, records, template, max_new_tokens, batch_size, show_progress, synced)


def weights_sharded(model) -> bool:
    """Each forward pass gathers weights from other processes: FSDP2 (torch's `fully_shard`, which accelerate's FSDP2
    applies without setting the flag transformers' `is_fsdp_managed_module` reads), FSDP1's wrapper, DTensor
    parameters (FSDP2, tensor parallelism), DeepSpeed ZeRO-3 (its partitioned parameters carry a `ds_id`)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if any(isinstance(module, (FSDPModule, FullyShardedDataParallel)) for module in model.modules()):
        return True
    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def in_lock_step(model) -> bool:
    """Generation must keep the processes' forward passes in step: weights sharded over several processes."""
    return (weights_sharded(model) and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def agreed_batch_size(batch_size: int) -> int:
    """The smallest batch size any process chose (each sizes it by its own prompts and memory): with equal shares,
    every process then makes the same number of `generate` calls. One all-reduce; every process must call it."""
    if torch.distributed.get_backend() == "gloo":  # the device the process group talks on
        device = torch.device("cpu")
    else:
        from accelerate import PartialState

        device = PartialState().device
    value = torch.tensor([batch_size], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return int(value.item())


def distributed_on_cpu() -> bool:
    """torchrun without GPUs: processes must ask for the CPU (gloo) or each would run alone as world size 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def context_length(config) -> int | None:
    """Positions the model can attend over (Llama-style `max_position_embeddings`, GPT-2's `n_positions`)."""
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def encode_prompts(tokenizer, prompts: list[str], template: Template, max_prompt_tokens: int | None = None
                   ) -> tuple[list[list[int]], int]:
    """Token ids of each prompt as training saw them, and how many were cropped to `max_prompt_tokens`.

    Special tokens are added exactly as `tokenize_dataset` adds them (by the template's type: a chat template
    writes its own). A prompt too long for `max_prompt_tokens` loses tokens from its start, after its leading
    special tokens (BOS, `<|im_start|>`), like the training side's left truncation, so the response header stays.
    """
    add_special = not isinstance(template, ChatTemplate)
    encoded = tokenizer(list(prompts), add_special_tokens=add_special)["input_ids"]
    if max_prompt_tokens is None:
        return encoded, 0
    special = set(tokenizer.all_special_ids)
    cropped = 0
    for n, ids in enumerate(encoded):
        if len(ids) > max_prompt_tokens:  # at least one non-special token stays after the leading ones
            keep = left_cut_positions(ids, max_prompt_tokens, special, max_lead=max_prompt_tokens - 1)
            encoded[n] = [ids[i] for i in keep]
            cropped += 1
    return encoded, cropped


def _generate(model, tokenizer, records, template: Template, max_new_tokens, batch_size, show_progress,
              synced: bool = False):
    context = context_length(model.config)
    max_prompt_tokens = None if context is None else context - max_new_tokens
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's context of "
                         f"{context} tokens: lower max_new_tokens")
    was_training = model.training
    model.eval()
    prompts, cropped = encode_prompts(tokenizer, [template.format_prompt(r, tokenizer) for r in records], template,
                                      max_prompt_tokens)
    if cropped:
        logger.warning(f"{cropped} of {len(prompts)} prompts are longer than the model's context ({context} tokens) "
                       f"minus max_new_tokens ({max_new_tokens}): their start was cut, leading special tokens kept")
    if batch_size is None and prompts:
        batch_size = default_batch_size(model, max(map(len, prompts)) + max_new_tokens)
        if synced:
            batch_size = agreed_batch_size(batch_size)
    generated = None
    if prompts and not synced and continuous_batching_supported(model):
        generated = _generate_continuous(model, tokenizer, prompts, max_new_tokens, batch_size, show_progress)
    if generated is None:
        generated = _generate_padded(model, tokenizer, prompts, max_new_tokens, batch_size, show_progress, synced)
    out = []
    for row in generated:
        if tokenizer.eos_token_id in row:  # padded batches fill finished rows up with padding after their EOS
            row = row[: row.index(tokenizer.eos_token_id)]
        out.append(extract_response(tokenizer.decode(row, skip_special_tokens=True), template=template))
    model.train(was_training)
    return out


def default_batch_size(model, tokens_per_row: int, most: int = 64) -> int:
    """As many rows as their KV cache (`tokens_per_row` each) fits in a quarter of the free memory, at most `most`:
    the GPU's own (each process has one), or the machine's, shared by its processes.

    A decoding step's cost grows far slower than its rows (few rows run far below the matmul peak: on 2 CPU cores a
    SmolLM2-135M step of ~29 rows took 1.5× one of a single row), so more rows pay: its 110 test answers came at 61
    generated tokens/s with 32 rows, 77 with 64 and 80 with 128 (benchmarks/README.md). The cap keeps the first
    answers coming soon."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    weight = next(model.parameters())
    row_bytes = 2 * layers * kv_heads * head_dim * weight.element_size() * tokens_per_row  # keys and values
    if weight.device.type == "cuda":
        free = torch.cuda.mem_get_info(weight.device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
        free //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # the processes of this machine share its memory
    return max(1, min(most, free // 4 // max(row_bytes, 1)))


def continuous_batching_supported(model) -> bool:
    """transformers' continuous batching (`generate_batch`) runs models on its attention interface, SDPA or eager,
    without adapters, with weights of their own (not sharded: its thread cannot keep in step with other
    processes); anything else gets padded batches."""
    from sft_hf.speed.varlen_attention import NAME as VARLEN

    return (os.environ.get("SFT_HF_CONTINUOUS_BATCHING", "1") != "0" and hasattr(model, "generate_batch")
            and not weights_sharded(model)
            and getattr(model, "_supports_attention_backend", False) and not hasattr(model, "peft_config")
            and model.config._attn_implementation in ("sdpa", "eager", VARLEN))


def _generate_continuous(model, tokenizer, prompts, max_new_tokens, batch_size, show_progress):
    """Continuous batching: a finished row's slot takes the next prompt at once, so one long answer no longer holds
    `batch_size - 1` finished rows (computed for nothing) until it ends. Greedy, so the tokens are plain `generate`'s
    (tests/test_generation.py). Returns None when it fails; the caller then uses padded batches."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from sft_hf.speed.varlen_attention import NAME as VARLEN, per_request_attention, supports_varlen

    longest = max(map(len, prompts)) + max_new_tokens
    page = 256
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                              else tokenizer.eos_token_id)
    cb_config = ContinuousBatchingConfig(
        page_size=page, max_requests_per_batch=batch_size, num_blocks=batch_size * -(-longest // page) + 1,
        max_batch_tokens=max(512, batch_size), allow_block_sharing=False, auto_switch_to_flash=False,
    )
    attn = model.config._attn_implementation
    if attn == VARLEN:  # the same SDPA for unpadded batches; continuous batching accepts it only by its own name
        model.set_attn_implementation("sdpa")
    # Each request's attention on its own keys (sft_hf/speed/varlen_attention.py) where every layer attends in full. On
    # CPU only: it reads the request lengths on the host, which CUDA graph capture forbids, and it is measured on CPU.
    own = supports_varlen(model.config) and model.device.type == "cpu"
    own_attention = per_request_attention() if own else contextlib.nullcontext()
    try:
        with own_attention:
            results = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb_config,
                                           progress_bar=show_progress, warmup=False)
    finally:
        if model.config._attn_implementation != attn:
            model.set_attn_implementation(attn)
    ordered = list(results.values())
    if len(ordered) != len(prompts) or any(r.error is not None for r in ordered):
        logger.warning("continuous batching failed (%s); generating in padded batches",
                       next((r.error for r in ordered if r.error), "missing results"))
        return None
    return [list(r.generated_tokens) for r in ordered]


def _generate_padded(model, tokenizer, prompts, max_new_tokens, batch_size, show_progress, synced: bool = False):
    """`model.generate` on left-padded batches of similar-length prompts. `synced`: every process calls this with
    as many prompts and the same batch size, and each `generate` runs until every process's rows have ended."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Longest prompts first: batches of similar length waste less compute on padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="Generating", disable=not show_progress):
        idx = order[start : start + batch_size]
        encoded = [prompts[i] for i in idx]
        width = max(map(len, encoded))
        # Left padding, so every row's next token is generated at the same position.
        input_ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded], device=model.device)
        attention_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
        generated = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, synced_gpus=synced,
        )
        for i, row in zip(idx, generated[:, width:].tolist()):
            out[i] = row
    return out


def request_text(record: dict) -> str:
    """What a record asks, for logs: Alpaca's instruction and input, or a conversation's last user message."""
    if record.get("messages"):
        users = [m.get("content") or "" for m in record["messages"] if m.get("role") == "user"]
        return repr(users[-1] if users else "")
    return f"{record['instruction']} {record.get('input') or ''!r}"
