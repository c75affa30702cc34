"""`sdpa_varlen`: variable-length attention from plain SDPA, so padding-free rows pay without flash-attention.

Padding-free batches (one row of concatenated examples, `position_ids` restarting at 0) waste nothing in the
linear layers, which are most of the compute. transformers runs them through a variable-length kernel only with
flash-attention (CUDA); with `sdpa` it builds a block-diagonal mask over the whole row, so attention costs
(row length)² and the batch ends up slower than a padded one (measured on W1: benchmarks/README.md).

This attention function splits the row back into its examples, pads them only for the attention product (causal
SDPA, no mask: real tokens never see the right padding) and unpads the result. The linears see no padding, the
attention sees each example alone, and the batch is the same batch the padded collator would have made: the
loss is the same number. Anything that is not a padding-free row (padded batches, generation with a cache) goes
to transformers' own `sdpa_attention_forward` with its usual mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_varlen"


_last_layout: tuple = (None, None)  # (position_ids, layout): every layer of one forward shares the same row


def _padded_layout(position_ids, query, key):
    """For a padding-free row: (source token of each padded slot, padded slots that are real tokens, examples,
    longest example); None when this is not a padding-free row."""
    global _last_layout
    if position_ids is None or query.shape[0] != 1 or position_ids.shape[0] != 1:
        return None
    if not position_ids.shape[1] == query.shape[2] == key.shape[2]:  # a filled KV cache: generation, not training
        return None
    cached_ids, cached_layout = _last_layout
    if cached_ids is position_ids:
        return cached_layout
    positions = position_ids[0].cpu()
    starts = (positions == 0).nonzero().flatten()
    layout = None
    if len(starts) > 1 and starts[0] == 0:
        lengths = torch.diff(starts, append=torch.tensor([len(positions)]))
        longest = int(lengths.max())
        slot = torch.arange(longest)
        real = slot < lengths[:, None]  # [examples, longest]
        # Padded slots may hold any token: with right padding a causal query never sees them, and what the padded
        # queries compute is dropped. Repeating the example's last token keeps this one gather.
        source = starts[:, None] + torch.minimum(slot, lengths[:, None] - 1)
        device = query.device
        layout = (source.flatten().to(device), real.flatten().nonzero().flatten().to(device), len(lengths), longest)
    _last_layout = (position_ids, layout)
    return layout


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          position_ids=None, **kwargs):
    layout = _padded_layout(position_ids, query, key)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise ValueError(f"attn_implementation={NAME} does not do sliding-window or soft-capped attention; "
                         "use attn_implementation=sdpa (padded batches) or flash_attention_2")
    source, real, examples, longest = layout

    def to_examples(states):  # [1, heads, tokens, dim] -> [examples, heads, longest, dim]
        heads, dim = states.shape[1], states.shape[3]
        return states[0].transpose(0, 1).index_select(0, source).view(examples, longest, heads, dim).transpose(1, 2)

    groups = getattr(module, "num_key_value_groups", 1)  # grouped-query attention: a key/value head per group
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = F.scaled_dot_product_attention(to_examples(query), to_examples(key), to_examples(value), dropout_p=dropout,
                                         scale=scaling, is_causal=True)
    heads, dim = out.shape[1], out.shape[3]
    out = out.transpose(1, 2).reshape(examples * longest, heads, dim).index_select(0, real)
    return out.unsqueeze(0), None  # [1, tokens, heads, dim], as sdpa_attention_forward returns


def register() -> str:
    AttentionInterface.register(NAME, sdpa_varlen_attention)
    # transformers' own SDPA masks (block-diagonal for a padding-free row): exact for whatever falls back to
    # sdpa_attention_forward, e.g. a model whose attention is not given position_ids
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def supports_varlen(config) -> bool:
    """Full causal attention everywhere: no sliding windows, no soft-capping (those need the mask)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in getattr(text, "layer_types", None) or []):
        return False
    return getattr(text, "attn_logit_softcapping", None) is None


register()
