"""bf16 weights with fp32 master copies kept by the optimizer, for CPUs that multiply bf16 natively (AMX, AVX512-BF16).

bf16 autocast, Trainer's `--bf16`, keeps the weights in fp32 and casts every weight to bf16 at every forward pass,
then casts every weight's gradient back to fp32: on a 2-core AMX Xeon those casts cost more than the AMX matmuls
they feed (benchmarks/README.md). Here the model itself holds bf16 weights, so forward and backward run in bf16 with
no casts, and `MasterWeightAdamW` keeps the fp32 truth: each step reads the bf16 gradient, updates the fp32 master
weight and its fp32 moments (torch's fused AdamW kernel, the same arithmetic as `adamw_torch_fused`), and writes the
rounded weight back, chunk by chunk so the temporaries stay in cache. Gradient clipping is folded into that pass
(the clip factor scales the gradient as it is read), instead of a separate pass over every gradient.

After training, `restore_master_weights` puts the fp32 masters back into the model, so what is evaluated and saved
is the full-precision model, as with autocast.
"""
from __future__ import annotations

import torch

CHUNK = 1 << 17  # elements per fused update: master, gradient and moments of a chunk stay in L2 (0.5 MB each)


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) over fp32 master copies of low-precision parameters."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._clip_factor: torch.Tensor | None = None  # set by clip_grad_norm_, applied by the next step()
        self.last_grad_norm: torch.Tensor | None = None
        self._scratch = torch.empty(0)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts each loaded state tensor to its parameter's dtype, which would round the fp32 masters and
        # moments to bf16: they are put back as saved, fp32
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            p = params[index]
            for key, value in saved.items():
                if key != "step" and torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device)
            if hasattr(p, "_fp32_master"):  # the masters come from the checkpoint, not from the loaded weights
                del p._fp32_master

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            master = getattr(p, "_fp32_master", None)  # the exact fp32 weight the model was loaded with
            state["master"] = master if master is not None else p.detach().float()
            state["exp_avg"] = torch.zeros_like(state["master"])
            state["exp_avg_sq"] = torch.zeros_like(state["master"])
            state["step"] = torch.tensor(0.0)
            if hasattr(p, "_fp32_master"):
                del p._fp32_master
        return state

    def gradients(self) -> list[torch.Tensor]:
        return [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The global L2 norm of the gradients (in fp32); with max_norm > 0 the next step scales them by
        min(1, max_norm / norm), as torch.nn.utils.clip_grad_norm_ would, without a pass of its own."""
        grads = self.gradients()
        if not grads:
            return torch.tensor(0.0)
        # per-tensor norms in the gradients' dtype (accumulated in fp32; asking for fp32 output would first copy every
        # bf16 gradient to fp32, a pass over every gradient), combined in fp32
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        if 0 < max_norm < float("inf"):
            self._clip_factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        self.last_grad_norm = norm  # StopOnNonFiniteLoss reads it instead of taking every norm again
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        factor, self._clip_factor, self.last_grad_norm = self._clip_factor, None, None
        unscale = None if factor is None else 1.0 / factor  # the fused kernel divides the gradient by it
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                weight, grad = p.view(-1), p.grad.view(-1)
                master, exp_avg, exp_avg_sq = (state[k].view(-1) for k in ("master", "exp_avg", "exp_avg_sq"))
                if self._scratch.numel() < min(CHUNK, grad.numel()):
                    self._scratch = torch.empty(min(CHUNK, max(grad.numel(), 1)), device=p.device)
                for start in range(0, grad.numel(), CHUNK):
                    part = slice(start, start + CHUNK)
                    g = self._scratch[: grad[part].numel()]
                    g.copy_(grad[part])
                    torch._fused_adamw_([master[part]], [g], [exp_avg[part]], [exp_avg_sq[part]], [],
                                        [state["step"]], lr=group["lr"], beta1=beta1, beta2=beta2,
                                        weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                                        maximize=False, grad_scale=unscale, found_inf=None)
                    weight[part].copy_(master[part])
        return loss


def cast_to_bf16_keeping_masters(model: torch.nn.Module) -> int:
    """Trainable parameters become bf16; each remembers its exact fp32 value for the optimizer's master copy.
    Returns how many parameters were cast (a tied weight is one parameter)."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.float32:
            p._fp32_master = p.detach().clone()
            p.data = p.data.to(torch.bfloat16)
            cast += 1
    return cast


@torch.no_grad()
def restore_master_weights(model: torch.nn.Module, optimizer: MasterWeightAdamW) -> None:
    """The fp32 masters back into the model (in place of their bf16 roundings), for evaluation and saving."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            master = optimizer.state.get(p, {}).get("master", getattr(p, "_fp32_master", None))
            if master is not None:
                p.data = master.clone()
    model.to(torch.float32)  # whatever was not trained (frozen weights) goes back to fp32 too
