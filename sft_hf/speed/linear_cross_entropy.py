"""The output projection and the cross-entropy in one pass over vocabulary chunks, for CPU training.

The stock path projects the trained positions onto the vocabulary in one GEMM (SmolLM2: [tokens, 576] @ [576,
49,152]), upcasts the logits to fp32, takes log-softmax, and backwards writes an fp32 gradient of the same size and
casts it back: five passes over a [tokens, 49,152] tensor, around the two slowest GEMMs of the step. Here the logits
are computed transposed, [vocabulary chunk, tokens], a chunk of 2048 rows of the weight at a time: that GEMM ran at
780 GFLOP/s on one AMX core against 450 for the whole [tokens, vocabulary] product, and the weight gradient from
the transposed chunk at 770 against 315 (benchmarks/README.md). The log-sum-exp is accumulated chunk by chunk in
fp32; backwards, each chunk's softmax is formed in fp32 from the stored logits and turned at once into its slice of
the weight gradient. The arithmetic is the stock path's: logits in the weight's dtype, softmax and loss in fp32, the
gradient of the logits rounded to the weight's dtype before its GEMMs; the loss is the sum over the targets divided
by `num_items_in_batch` (tests/test_speed.py checks loss and gradients against the stock path).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 2048  # vocabulary rows per GEMM: 1024-2048 measured best for SmolLM2's 49,152 x 576 head on AMX


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor):
        vocab = weight.shape[0]
        logits_t = hidden.new_empty(vocab, hidden.shape[0])  # [vocabulary, tokens], the weight's dtype
        running_max = torch.full((hidden.shape[0],), float("-inf"), device=hidden.device)
        running_sum = torch.zeros(hidden.shape[0], device=hidden.device)
        for start in range(0, vocab, CHUNK):
            chunk = logits_t[start : start + CHUNK]
            torch.mm(weight[start : start + CHUNK], hidden.t(), out=chunk)
            scores = chunk.float()
            new_max = torch.maximum(running_max, scores.amax(0))
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(scores - new_max).sum(0)
            running_max = new_max
        log_normalizer = running_max + torch.log(running_sum)  # log-sum-exp over the vocabulary, per token
        target_logits = logits_t.gather(0, targets[None]).squeeze(0).float()
        loss = (log_normalizer - target_logits).sum() / divisor
        ctx.save_for_backward(hidden, weight, targets, logits_t, log_normalizer)
        ctx.divisor = divisor
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, targets, logits_t, log_normalizer = ctx.saved_tensors
        scale = grad_loss / ctx.divisor
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        # the hidden states' gradient, summed over chunks in fp32 (one GEMM over the transposed [vocabulary, tokens]
        # gradient ran slower than these chunked ones)
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device) if ctx.needs_input_grad[0] else None
        tokens = torch.arange(hidden.shape[0], device=hidden.device)
        for start in range(0, weight.shape[0], CHUNK):
            chunk = logits_t[start : start + CHUNK]  # overwritten by its gradient: the logits are not needed again
            probs = torch.exp(chunk.float() - log_normalizer)  # softmax, fp32
            here = (targets >= start) & (targets < start + chunk.shape[0])
            probs[targets[here] - start, tokens[here]] -= 1.0
            chunk.copy_(probs.mul_(scale))
            if grad_weight is not None:
                torch.mm(chunk, hidden, out=grad_weight[start : start + CHUNK])
            end = start + chunk.shape[0]
            if grad_hidden is not None and (end % (2 * CHUNK) == 0 or end == weight.shape[0]):
                begin = end - 2 * CHUNK if end % (2 * CHUNK) == 0 else end - end % (2 * CHUNK)
                grad_hidden += logits_t[begin:end].t() @ weight[begin:end]  # two chunks a GEMM: faster than one
        return grad_hidden.to(hidden.dtype) if grad_hidden is not None else None, grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         num_items_in_batch=None) -> torch.Tensor:
    """sum over tokens of cross_entropy(hidden @ weight.T, targets) / num_items_in_batch (default: the token count).
    hidden [tokens, dim] and weight [vocabulary, dim] in one dtype; every target is a real token (no ignore index)."""
    divisor = targets.numel() if num_items_in_batch is None else num_items_in_batch
    if isinstance(divisor, torch.Tensor):
        divisor = divisor.to(hidden.device)
    return _LinearCrossEntropy.apply(hidden, weight, targets, divisor)


class HiddenStatesHead(nn.Linear):
    """The model's output projection; inside `returning_hidden_states()` it passes its input through, so the model's
    forward hands back the final hidden states (of the kept positions) for `linear_cross_entropy`."""

    _pass_through = False

    def forward(self, x):
        return x if self._pass_through else super().forward(x)

    @contextlib.contextmanager
    def returning_hidden_states(self):
        self._pass_through = True
        try:
            yield self
        finally:
            self._pass_through = False


def fused_head(model: nn.Module, sample: dict) -> HiddenStatesHead | None:
    """The model's output projection as a HiddenStatesHead, if its logits are exactly `lm_head(final hidden state)`:
    checked on a few tokens of `sample` (a model that soft-caps or scales its logits after the head is left alone)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    ids = sample["input_ids"][:1, :8]
    extra = {"position_ids": sample["position_ids"][:1, :8]} if "position_ids" in sample else {}
    was_training = model.training
    model.eval()  # no dropout: the two forward passes below must see the same network
    try:
        return _checked_head(model, head, ids, extra)
    finally:
        model.train(was_training)


def _checked_head(model, head, ids, extra):
    with torch.no_grad():
        logits = model(input_ids=ids, **extra).logits
        head.__class__ = HiddenStatesHead
        with head.returning_hidden_states():
            hidden = model(input_ids=ids, **extra).logits
        if (hidden.shape[-1] != head.in_features or hidden.shape[:-1] != logits.shape[:-1]
                or not torch.allclose(F.linear(hidden, head.weight).to(logits.dtype), logits)):
            head.__class__ = nn.Linear
            return None
    return head
