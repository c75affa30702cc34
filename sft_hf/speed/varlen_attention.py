"""`sdpa_varlen`: variable-length attention from plain SDPA, so padding-free rows pay without flash-attention.

Padding-free batches (one row of concatenated examples, `position_ids` restarting at 0) waste nothing in the
linear layers, which are most of the compute. transformers runs them through a variable-length kernel only with
flash-attention (CUDA); with `sdpa` it builds a block-diagonal mask over the whole row, so attention costs
(row length)² and the batch ends up slower than a padded one (measured in benchmarks/README.md).

This attention function splits the row back into its examples, pads them only for the attention product (causal
SDPA, no mask: real tokens never see the right padding) and unpads the result. The linears see no padding, the
attention sees each example alone, and the batch is the same batch the padded collator would have made: the
loss is the same number. Anything that is not a padding-free row (padded batches, generation with a cache) goes
to transformers' own `sdpa_attention_forward` with its usual mask.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_varlen"


_last_layout: tuple = (None, None)  # (position_ids, layout): every layer of one forward shares the same row


def _pad_segments(starts, lengths):
    """Segments of a flat row (`starts`, `lengths`: 1-d tensors) as a padded [segments, longest] gather: the source
    index of each slot, and which slots are real. Padded slots repeat the segment's last index, so one gather serves
    every slot; callers mask them out or drop what they compute."""
    slot = torch.arange(int(lengths.max()))
    return starts[:, None] + torch.minimum(slot, lengths[:, None] - 1), slot < lengths[:, None]


def _gather_segments(states, source):
    """[1, heads, tokens, dim] -> [segments, heads, longest, dim]: the tokens `source` ([segments, longest]) picks.
    Whole tokens are gathered from the token-major view: continuous batching's keys and values are [tokens, heads,
    dim] in memory (its cache read-back), and gathering along the head-major view's token dimension instead was ~20×
    slower on CPU there (a third of a decoding step)."""
    heads, dim = states.shape[1], states.shape[3]
    return states[0].transpose(0, 1).index_select(0, source.flatten()).view(*source.shape, heads, dim).transpose(1, 2)


def _padded_layout(position_ids, query, key):
    """For a padding-free row: (source token of each padded slot [examples, longest], the padded slots that are real
    tokens, flattened); None when this is not a padding-free row."""
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
        # Padded slots may hold any token: with right padding a causal query never sees them, and what the padded
        # queries compute is dropped.
        source, real = _pad_segments(starts, lengths)  # [examples, longest]
        layout = (source.to(query.device), real.flatten().nonzero().flatten().to(query.device))
    _last_layout = (position_ids, layout)
    return layout


# On CPU, SDPA's bf16 flash kernel is slow backwards for short examples: below about 200 tokens two batched matmuls
# and a softmax are faster, above it flash wins (the timings are in docs/speed.md and benchmarks/README.md).
MATMUL_ATTENTION_MAX_LENGTH = 192


@functools.cache
def _causal_bias(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu(1)


def causal_attention_by_matmul(query, key, value, scaling=None):
    """Causal attention of [examples, heads, tokens, dim] as HF's eager attention computes it in bf16 (scores in
    the input dtype, softmax in fp32), with the causal mask added inside the first matmul."""
    examples, heads, tokens, dim = query.shape
    scores = torch.baddbmm(_causal_bias(tokens, query.dtype, query.device).expand(examples * heads, -1, -1),
                           query.flatten(0, 1), key.flatten(0, 1).transpose(1, 2),
                           alpha=dim**-0.5 if scaling is None else scaling)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.bmm(weights, value.flatten(0, 1)).view(examples, heads, tokens, dim)


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          position_ids=None, **kwargs):
    layout = _padded_layout(position_ids, query, key)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise ValueError(f"attn_implementation={NAME} does not do sliding-window or soft-capped attention; "
                         "use attn_implementation=sdpa (padded batches) or flash_attention_2")
    source, real = layout
    groups = getattr(module, "num_key_value_groups", 1)  # grouped-query attention: a key/value head per group
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    query, key, value = (_gather_segments(states, source) for states in (query, key, value))
    if query.device.type == "cpu" and query.dtype != torch.float32 and query.shape[2] <= MATMUL_ATTENTION_MAX_LENGTH \
            and not (dropout and module.training):
        out = causal_attention_by_matmul(query, key, value, scaling)
    else:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True)
    heads, dim = out.shape[1], out.shape[3]
    out = out.transpose(1, 2).reshape(source.numel(), heads, dim).index_select(0, real)
    return out.unsqueeze(0), None  # [1, tokens, heads, dim], as sdpa_attention_forward returns


_last_requests: tuple = (None, None)  # (cu_seq_lens_q, layout): every layer of one generation step shares it


def _request_layout(cu_seq_lens_q, cu_seq_lens_k, device):
    """One continuous-batching step's requests: the decoding ones (one query each) as a padded gather over their
    keys, the others (prompts being read) as (query slice, key slice) pairs."""
    global _last_requests
    cached_q, cached_layout = _last_requests
    if cached_q is cu_seq_lens_q:
        return cached_layout
    q, k = cu_seq_lens_q.tolist(), cu_seq_lens_k.tolist()
    q_lens = [b - a for a, b in zip(q, q[1:])]
    decoding = [i for i, n in enumerate(q_lens) if n == 1]
    layout = dict(prompts=[(q[i], q[i + 1], k[i], k[i + 1]) for i, n in enumerate(q_lens) if n > 1], decoding=None)
    if decoding:
        source, seen = _pad_segments(torch.tensor([k[i] for i in decoding]),
                                     torch.tensor([k[i + 1] - k[i] for i in decoding]))  # [decoding, longest]
        layout["decoding"] = (torch.tensor([q[i] for i in decoding], device=device), source.to(device),
                              seen[:, None, None, :].to(device))
    _last_requests = (cu_seq_lens_q, layout)
    return layout


def paged_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA for transformers' continuous batching (`generate_batch`) with each request alone.

    transformers runs a step's requests as one row and masks it block-diagonally, so attention costs
    (requests × their keys)² and larger batches, which amortise reading the weights, stop paying (benchmarks/README.md).
    Here decoding requests (one query each) attend in one padded SDPA over their own keys, and each prompt being read
    attends to its own keys, causally, aligned at the end (a prompt read in chunks sees its earlier chunks). The
    result is the masked product's, token for token (tests/test_generation.py)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if isinstance(cu_k, dict):
        cu_k = next(iter(cu_k.values())) if len(cu_k) == 1 else None
    if cu_q is None or cu_k is None or query.shape[0] != 1 or kwargs.get("sliding_window") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layout = _request_layout(cu_q, cu_k, query.device)
    groups = getattr(module, "num_key_value_groups", 1)
    heads, tokens, dim = query.shape[1:]
    out = query.new_empty(tokens, heads, dim)  # returned as [1, tokens, heads, dim], as sdpa_attention_forward does
    if layout["decoding"] is not None:
        rows, source, seen = layout["decoding"]
        # grouped queries: the `groups` query heads of a key head become `groups` query rows of that head
        q = query[0].transpose(0, 1).index_select(0, rows).reshape(len(rows), key.shape[1], groups, dim)
        o = F.scaled_dot_product_attention(q, _gather_segments(key, source), _gather_segments(value, source),
                                           attn_mask=seen, scale=scaling)
        out.index_copy_(0, rows, o.reshape(len(rows), heads, dim))
    for q_start, q_end, k_start, k_end in layout["prompts"]:
        k, v = key[:, :, k_start:k_end], value[:, :, k_start:k_end]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        n_q, n_k = q_end - q_start, k_end - k_start
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril(n_k - n_q)  # aligned at the end
        out[q_start:q_end] = F.scaled_dot_product_attention(
            query[:, :, q_start:q_end], k, v, attn_mask=None if n_q == n_k else causal, is_causal=n_q == n_k,
            scale=scaling)[0].transpose(0, 1)
    return out.unsqueeze(0), None


class per_request_attention:
    """Within the block, transformers' continuous batching (which accepts only the name "sdpa" among the SDPA kinds)
    runs `paged_sdpa_attention`; the previous entry is restored on exit."""

    def __enter__(self):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.functions = ALL_ATTENTION_FUNCTIONS
        self.previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")
        ALL_ATTENTION_FUNCTIONS["sdpa"] = paged_sdpa_attention  # this instance only: the class mapping is untouched
        return self

    def __exit__(self, *exc):
        if self.previous is None:
            self.functions._local_mapping.pop("sdpa", None)
        else:
            self.functions["sdpa"] = self.previous


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
