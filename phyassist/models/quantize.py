"""4-bit NF4 for Mixture-of-Experts weights that bitsandbytes' 4-bit load leaves in 16 bit.

transformers 5.x stores each layer's experts as two fused 3-D parameters (``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``). bitsandbytes quantizes only ``nn.Linear``, so a
"4-bit" Mixtral-8x7B keeps ~85 GiB of bf16 experts. Two ways to fix it were measured
(bench/finetune_mixtral.md):

* ``parametrize``: bitsandbytes' ``replace_parameter_4bit`` on the fused tensors. The stock
  expert loop then indexes the dequantized tensor per expert, and autograd keeps the whole
  dequantized 3-D tensor of a layer alive for the backward pass.
* ``grouped`` (default): :class:`Quant4bitExperts`, our own module. Tokens are sorted by expert,
  each weight tensor is dequantized once per call, and the matmuls of all experts run as one
  grouped GEMM; the backward pass dequantizes again instead of keeping the bf16 copy (unless
  ``save_dequantized`` is set, which trades one layer's 2.6 GiB for one dequantization under
  gradient checkpointing). Same packed bytes as ``parametrize``; faster and leaner.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def _bnb():
    import bitsandbytes.functional as bnbf

    return bnbf


class Packed4bit(nn.Module):
    """One weight tensor in packed 4-bit (uint8 storage) with its bitsandbytes quant state."""

    def __init__(self, weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True,
                 blocksize: int = 64):
        super().__init__()
        data, state = _bnb().quantize_4bit(weight.detach().contiguous(), blocksize=blocksize,
                                           compress_statistics=double_quant, quant_type=quant_type)
        self.register_buffer("packed", data, persistent=True)
        self.quant_state = state
        self.shape = tuple(weight.shape)

    def dequantize(self) -> torch.Tensor:
        self._sync_state_device()
        return _bnb().dequantize_4bit(self.packed, self.quant_state).view(self.shape)

    def _sync_state_device(self) -> None:
        if self.quant_state.absmax.device != self.packed.device:
            self.quant_state.to(self.packed.device)

    def nbytes(self) -> int:
        """Packed bytes plus the quantization statistics (absmax, nested absmax, code)."""
        qs = self.quant_state
        n = self.packed.numel() * self.packed.element_size() + qs.absmax.numel() * qs.absmax.element_size()
        if qs.nested and qs.state2 is not None:
            n += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
        return n


def uses_grouped_mm(x: torch.Tensor) -> bool:
    """torch's grouped GEMM runs bf16 on CUDA; elsewhere a per-expert loop is used."""
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch.nn.functional, "grouped_mm")


def _grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``x[rows of expert e] @ w[e]`` for every expert; x: [N, K], w: [E, K, M] -> [N, M].

    One grouped GEMM where torch has one for the device and dtype (Hopper bf16), else a loop.
    """
    if uses_grouped_mm(x):
        return torch.nn.functional.grouped_mm(x, w, offs=offsets)
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(x[start:start + n] @ w[e])
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])


def _swiglu(h: torch.Tensor, inter: int) -> torch.Tensor:
    gate, up = h[:, :inter], h[:, inter:]
    return torch.nn.functional.silu(gate) * up


class _GroupedExpertMLP(torch.autograd.Function):
    """Expert MLP on expert-sorted tokens; frozen 4-bit weights, gradient for the input only.

    Saves the input (and the gate/up activations unless ``recompute``), never the dequantized
    weights unless ``save_dequantized``; the backward pass dequantizes them again.
    """

    @staticmethod
    def forward(ctx, x, offsets, module, counts, recompute):
        w1 = module.gate_up.dequantize()  # [E, 2I, H]
        w2 = module.down.dequantize()  # [E, H, I]
        h = _grouped_matmul(x, w1.transpose(1, 2), offsets, counts)
        a = _swiglu(h, module.intermediate_dim)
        y = _grouped_matmul(a, w2.transpose(1, 2), offsets, counts)
        ctx.module, ctx.counts, ctx.recompute = module, counts, recompute
        ctx.weights = (w1, w2) if module.save_dequantized else None
        ctx.save_for_backward(x, offsets, *(() if recompute else (h,)))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, offsets, *saved = ctx.saved_tensors
        module, counts = ctx.module, ctx.counts
        w1, w2 = ctx.weights or (module.gate_up.dequantize(), module.down.dequantize())
        ctx.weights = None
        h = saved[0] if saved else _grouped_matmul(x, w1.transpose(1, 2), offsets, counts)
        inter = module.intermediate_dim
        gate, up = h[:, :inter], h[:, inter:]
        grad_a = _grouped_matmul(grad_y.to(w2.dtype), w2, offsets, counts)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_gate = grad_a * up * (sig * (1 + gate * (1 - sig)))
        grad_up = grad_a * silu
        grad_x = _grouped_matmul(torch.cat([grad_gate, grad_up], dim=1), w1, offsets, counts)
        return grad_x, None, None, None, None


class Quant4bitExperts(nn.Module):
    """Drop-in replacement for transformers' fused experts (``MixtralExperts`` and kin) with
    NF4 weights. ``forward(hidden_states, top_k_index, top_k_weights)`` as the original."""

    def __init__(self, experts: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None, recompute: bool = False,
                 save_dequantized: bool = False):
        super().__init__()
        w1, w2 = experts.gate_up_proj, experts.down_proj
        self.num_experts, inter2, self.hidden_dim = w1.shape
        self.intermediate_dim = inter2 // 2
        dtype = compute_dtype or w1.dtype
        self.gate_up = Packed4bit(w1.data.to(dtype), quant_type, double_quant)
        self.down = Packed4bit(w2.data.to(dtype), quant_type, double_quant)
        self.act_name = getattr(getattr(experts, "act_fn", None), "__class__", type(None)).__name__
        if self.act_name not in ("SiLUActivation", "SiLU"):
            raise ValueError(f"Quant4bitExperts supports SiLU-gated experts only, got {self.act_name}")
        self.recompute = recompute
        self.save_dequantized = save_dequantized

    def forward(self, hidden_states, top_k_index, top_k_weights):
        tokens, k = top_k_index.shape
        flat_expert = top_k_index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of = torch.div(order, k, rounding_mode="floor")
        counts_t = torch.bincount(flat_expert, minlength=self.num_experts)
        offsets = torch.cumsum(counts_t, 0).to(torch.int32)
        x = hidden_states[token_of].to(self.gate_up.quant_state.dtype)
        # The loop fallback needs host-side counts (a device sync); the grouped GEMM does not.
        counts = [0] * self.num_experts if uses_grouped_mm(x) else counts_t.tolist()
        y = _GroupedExpertMLP.apply(x, offsets, self, counts, self.recompute)
        y = y * top_k_weights.reshape(-1)[order, None].to(y.dtype)
        out = torch.zeros_like(hidden_states)
        return out.index_add_(0, token_of, y.to(out.dtype))

    def nbytes(self) -> int:
        return self.gate_up.nbytes() + self.down.nbytes()


def iter_fused_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules holding fused 3-D expert parameters that are still floating point."""
    for name, mod in model.named_modules():
        params = [getattr(mod, p, None) for p in EXPERT_PARAMS]
        if all(isinstance(p, nn.Parameter) and p.dim() == 3 and p.is_floating_point() for p in params):
            yield name, mod


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _parametrize(mod: nn.Module, quant_type: str, double_quant: bool) -> None:
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    for p in EXPERT_PARAMS:
        replace_parameter_4bit(mod, p, compress_statistics=double_quant, quant_type=quant_type)


def quantize_moe_experts(model: nn.Module, quant_cfg, method: str = "grouped", **kwargs) -> int:
    """Quantize every fused expert tensor of ``model`` to 4 bit in place; returns how many
    expert modules were converted. ``method``: ``grouped`` (our module) or ``parametrize``."""
    from phyassist.models.loading import torch_dtype

    compute = torch_dtype(quant_cfg.compute_dtype)
    done = 0
    for name, mod in list(iter_fused_experts(model)):
        if method == "parametrize":
            _parametrize(mod, quant_cfg.quant_type, quant_cfg.double_quant)
        elif method == "grouped":
            new = Quant4bitExperts(mod, quant_cfg.quant_type, quant_cfg.double_quant, compute, **kwargs)
            _set_submodule(model, name, new)
        else:
            raise ValueError(f"unknown expert quantization method {method!r} (grouped | parametrize)")
        done += 1
    return done


def sixteen_bit_weights(model: nn.Module, min_dim: int = 2) -> list[str]:
    """Names of matrix weights still in 16/32-bit float, router, norms and embeddings excepted
    (the QLoRA recipe keeps those in full precision)."""
    keep = ("embed_tokens", "lm_head", "norm", "gate.weight", "lora_", "router")
    bad = []
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and p.dim() >= min_dim and not any(k in name for k in keep):
            bad.append(name)
    return bad
