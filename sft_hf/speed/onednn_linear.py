"""fp32 `nn.Linear` on oneDNN instead of MKL, for CPU training (see benchmarks/README.md).

Why: PyTorch's CPU wheels run fp32 matmuls through MKL's sgemm, which on non-Intel x86 CPUs (AMD EPYC/Ryzen) takes
its AVX2 path even where AVX-512 is available; oneDNN, also inside every PyTorch CPU wheel, dispatches on the ISA
and runs the same fp32 GEMM about 2× faster there (measured on the benchmark machine, AMD EPYC Zen 5: 117 vs 250
GFLOP/s per core). The result is still IEEE fp32 (fp32 multiply-accumulate, only the summation order differs).

`use_onednn_linear(model)` swaps the class of every fp32 `nn.Linear` on the CPU for `OneDNNLinear` (same
parameters, same state_dict, same `save_pretrained` output); forward and both backward matmuls go to
`torch.ops.mkldnn._linear_pointwise`, which takes ordinary strided tensors.
"""
from __future__ import annotations

import os

import torch
from torch import nn

_linear = torch.ops.mkldnn._linear_pointwise if hasattr(torch.ops.mkldnn, "_linear_pointwise") else None


def _mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T through oneDNN (a: [m, k], b: [n, k], any strides)."""
    return _linear(a, b, None, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2d = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2d, weight)
        ctx.has_bias = bias is not None
        y = _linear(x2d, weight, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm_t(g, weight.t()).reshape(*grad_out.shape[:-1], weight.shape[1])  # g @ W
        if ctx.needs_input_grad[1]:
            grad_w = _mm_t(g.t(), x2d.t())  # g.T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype != torch.float32 or x.device.type != "cpu" or self.weight.dtype != torch.float32
                or torch.is_autocast_enabled("cpu") or x.numel() == 0):
            # autocast, other dtypes, moved to a GPU: the stock path; also zero rows (an MoE expert that got no
            # tokens), where oneDNN cannot build the weight-gradient product and nn.Linear returns empty tensors
            return super().forward(x)
        return _OneDNNLinearFunction.apply(x, self.weight, self.bias)


def onednn_pays() -> bool:
    """oneDNN's fp32 GEMM beats MKL's where the CPU has AVX-512 but is not an Intel one (MKL's AVX2 path there)."""
    if _linear is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        return False
    if "avx512f" not in cpuinfo or "GenuineIntel" in cpuinfo:
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()  # oneDNN held below AVX-512: nothing to gain
    if not (isa in ("ALL", "DEFAULT") or "AVX512" in isa or "AMX" in isa or "AVX10" in isa):
        return False
    try:  # a private op: check it still exists and computes x @ W.T + b before relying on it
        x, w, b = torch.randn(5, 7), torch.randn(3, 7), torch.randn(3)
        return torch.allclose(_linear(x, w, b, "none", [], ""), torch.nn.functional.linear(x, w, b), atol=1e-5)
    except Exception:
        return False


def use_onednn_linear(model: nn.Module) -> int:
    """Swap every fp32 CPU `nn.Linear` of `model` to `OneDNNLinear`; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.__class__ = OneDNNLinear
            swapped += 1
    return swapped
