"""Local attention kernels: what each `attention` choice of the Parallel Config really calls.

  sdpa   torch's scaled_dot_product_attention (picks flash / memory-efficient / math itself)
  math   the reference: explicit softmax in fp32 accumulation (slow; for checks)
  flash  flash-attn's flash_attn_func (CUDA, fp16 / bf16; `pip install flash-attn --no-build-isolation`)
  sage   SageAttention's sageattn (CUDA, fp16 / bf16; `pip install sageattention`)

Layout: q, k, v are (B, H, S, D). Ring attention needs the log-sum-exp of each partial attention to merge them;
`attention_with_lse` returns it from a kernel that exposes it (flash-attn, torch's flash / CPU flash kernels) and
from the math form otherwise. SageAttention exposes none, so Ring steps under `sage` use torch's kernel with LSE,
and a masked call (the padded tail of a ragged sequence) uses sdpa / math whatever the choice: neither flash-attn's
nor SageAttention's dense call takes a key mask.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

# name -> (python module that must be importable, the pip line that installs it); None = part of torch
PACKAGES = {"sdpa": None, "math": None,
            "flash": ("flash_attn", "pip install flash-attn --no-build-isolation"),
            "sage": ("sageattention", "pip install sageattention")}
CUDA_ONLY = ("flash", "sage")


def missing_package(name: str) -> str | None:
    """The pip line to run when kernel `name` needs a package this Python cannot import; None when it can."""
    need = PACKAGES.get(name)
    if need is None:
        return None
    module, pip = need
    return None if importlib.util.find_spec(module) is not None else pip


def _math(q, k, v, mask=None):
    scale = q.shape[-1] ** -0.5
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.matmul(p, v.float()).to(q.dtype), lse


def _half(t):
    return t.dtype in (torch.float16, torch.bfloat16)


class HostKernel:
    """A host attention function (ComfyUI's signature, with skip_reshape / skip_output_reshape: (B, H, S, D) in and
    out) as the local kernel of a split call: the one a checkpoint asks ComfyUI for (parallel/attention.py)."""

    def __init__(self, function):
        self.function = function

    def __call__(self, q, k, v):
        return self.function(q, k, v, q.shape[1], skip_reshape=True, skip_output_reshape=True)


def attention(q, k, v, backend: str = "sdpa", mask=None) -> torch.Tensor:
    """Attention on (B, H, S, D) with the chosen kernel; a key mask routes to sdpa (see module doc)."""
    if isinstance(backend, HostKernel):
        if mask is not None:  # a key mask here is one keep-vector for every query: drop those keys, no mask needed
            keep = mask.reshape(-1, mask.shape[-1])[0]
            k, v = k[:, :, keep], v[:, :, keep]
        return backend(q, k, v)
    if backend == "math":
        return _math(q, k, v, mask)[0]
    if mask is None and q.is_cuda and _half(q):
        if backend == "flash":
            from flash_attn import flash_attn_func
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        if backend == "sage":
            from sageattention import sageattn
            return sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_with_lse(q, k, v, backend: str = "sdpa", mask=None):
    """(out, lse (B, H, S) fp32) for the Ring merge, from a kernel that returns the log-sum-exp."""
    if backend != "math" and mask is None:
        try:
            if q.is_cuda and _half(q) and backend == "flash":
                from flash_attn import flash_attn_func
                out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              return_attn_probs=True)
                return out.transpose(1, 2), lse.float()
            if q.device.type == "cpu":
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
                return out, lse.float()
            if q.is_cuda and _half(q):
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
                return out, lse.float()
        except (RuntimeError, NotImplementedError):
            pass
    return _math(q, k, v, mask)
