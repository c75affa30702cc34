"""Greedy generation for held-out instructions, and exact match."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from sft_hf.templates import Template, get_template


@torch.no_grad()
def generate_responses(
    model, tokenizer, records: list[dict], template: str | Template = "alpaca", max_new_tokens: int = 256,
    batch_size: int = 32, show_progress: bool = True,
) -> list[str]:
    """Greedy responses, prompt removed (only new tokens are decoded), stopped at EOS, whitespace-stripped."""
    template = get_template(template)
    add_special = template.name != "chat_template"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    # Longest prompts first: batches of similar length waste less compute on padding.
    prompts = [template.format_prompt(r, tokenizer) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="Generating", disable=not show_progress):
        idx = order[start : start + batch_size]
        encoded = [tokenizer(prompts[i], add_special_tokens=add_special)["input_ids"] for i in idx]
        width = max(map(len, encoded))
        # Left padding, so every row's next token is generated at the same position.
        input_ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded], device=model.device)
        attention_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
        generated = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
        )
        for i, row in zip(idx, generated[:, width:].tolist()):
            if tokenizer.eos_token_id in row:  # finished rows are filled up with padding after their EOS
                row = row[: row.index(tokenizer.eos_token_id)]
            out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    model.train(was_training)
    return out


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / len(references)
