"""4-bit NF4 for Mixture-of-Experts weights that bitsandbytes' 4-bit load leaves in 16 bit.

transformers 5.x stores each layer's experts as two fused 3-D parameters (``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``). bitsandbytes quantizes only ``nn.Linear``, so a
"4-bit" Mixtral-8x7B keeps ~85 GiB of bf16 experts. Two ways to fix it (``model.quant.experts_method``):

* ``parametrize``: bitsandbytes' ``replace_parameter_4bit`` on the fused tensors, run by
  transformers' own expert code (``torch._grouped_mm``); works for any fused-expert MoE.
* ``grouped``: :class:`Quant4bitExperts`, the kit's module: the routed expert MLP as one autograd
  node (grouped GEMMs, Triton SwiGLU, gathers instead of scatter-adds, no recompute of the down
  projection). Same packed bytes as ``parametrize``; faster, with attention-only checkpointing
  (:mod:`phyassist.models.mixtral4bit.checkpointing`) at whole-layer checkpointing's memory, so
  ``configs/paper.yaml`` uses it. The measurements: bench/finetune_mixtral.md.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from phyassist.models.mixtral4bit.decode import DECODE_DEFAULTS, kernel_fits, route, routed_experts
from phyassist.models.mixtral4bit.kernels import dequantize_nf4, gather_sum, swiglu_backward_, swiglu_forward
from phyassist.models.quant import torch_dtype

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
EXPERT_GEMMS = ("grouped", "per_expert")  # model.quant.expert_gemm


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

    def dequantize(self, triton: bool = True) -> torch.Tensor:
        """The bf16 weight; bitsandbytes' values, from the kit's one-pass Triton kernel on GPUs
        (``triton=False``: bitsandbytes' own kernel, for comparison)."""
        self._sync_state_device()
        return dequantize_nf4(self.packed, self.quant_state, triton=triton).view(self.shape)

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


def _grouped_matmul(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
    """``x[rows of expert e] @ w[e]`` for every expert; x: [N, K], w: [E, K, M] -> [N, M].

    ``counts`` None: one grouped GEMM (torch's, Hopper bf16) over the groups ending at ``ends``,
    else one GEMM per expert of ``counts[e]`` rows, written in place into the output.
    """
    if counts is None:
        return torch.nn.functional.grouped_mm(x, w, offs=ends)
    out, start = x.new_empty(x.shape[0], w.shape[-1]), 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(x[start:start + n], w[e], out=out[start:start + n])
        start += n
    return out


def _host_counts(ends: torch.Tensor):
    """Rows per expert for the host (a loop over experts needs them). On a GPU the copy into
    pinned memory is queued without waiting; ``wait()`` returns the list, so the work queued in
    between (the weights' dequantization) keeps the GPU busy while the host waits for the router."""
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    if not counts.is_cuda:
        return counts.tolist
    host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
    host.copy_(counts, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return lambda: (done.synchronize(), host.tolist())[1]


class _MoEExperts(torch.autograd.Function):
    """The whole routed expert MLP of one layer as one autograd node, frozen 4-bit weights.

    Forward: tokens gathered in expert order, each weight tensor dequantized once, grouped
    GEMMs, fused SwiGLU with the routing weight folded in, and a gather + sum back to token order.
    Backward: input and routing-weight gradients only (the 4-bit weights are frozen), with gathers
    where autograd's indexing would scatter-add, and the down projection's forward never
    recomputed: ``grad_w = sum(grad_a * a)`` comes out of the SwiGLU backward kernel.

    ``keep_h`` saves the gate/up activations (470 MB per Mixtral layer at 4 x 1024 tokens);
    otherwise the backward recomputes them with one grouped GEMM and the layer keeps only its
    input. The dequantized weights are saved only where ``module.keep_weights`` is set (2.6 GiB a
    Mixtral-8x7B layer): the backward then reuses the forward's bf16 values, bit for bit the same,
    instead of dequantizing both tensors again.
    """

    @staticmethod
    def forward(ctx, hidden, weights, index, module, keep_h):
        k = index.shape[1]
        # rows per expert as offsets into the sorted rows, without a device-to-host sync (decode_fuse 0: torch's
        # sort, the path before the routing kernel, for the benchmarks' side-by-side runs)
        token_of_row, inverse, ends, w_row = route(index, weights, module.num_experts, kernel=bool(module.decode_fuse))
        x = hidden.to(module.compute_dtype)
        # The per-expert loop needs the counts on the host (one device sync a layer), the grouped
        # GEMM does not; the copy is queued first and waited for once the dequantization is queued.
        wait = None if module.gemm == "grouped" and uses_grouped_mm(x) else _host_counts(ends)
        xs = x.index_select(0, token_of_row)
        keep_w = module.keep_weights  # the backward reuses the dequantized weights
        w1 = module.gate_up.dequantize(module.triton_dequantize)  # [E, 2I, H]
        counts = wait() if wait else None
        h = _grouped_matmul(xs, w1.transpose(1, 2), ends, counts)
        kept_w1 = w1 if keep_w else None
        del w1, xs
        a = swiglu_forward(h, w_row)
        if not keep_h:
            del h
        w2 = module.down.dequantize(module.triton_dequantize)  # [E, H, I]
        y = _grouped_matmul(a, w2.transpose(1, 2), ends, counts)
        kept_w2 = w2 if keep_w else None
        del w2, a
        out = gather_sum(y, inverse, k)
        ctx.module, ctx.counts, ctx.k = module, counts, k
        ctx.hidden_dtype, ctx.weights_dtype = hidden.dtype, weights.dtype
        # Through save_for_backward (not ctx attributes) so that gradient checkpointing's
        # saved-tensor hooks manage them.
        ctx.save_for_backward(x, token_of_row, inverse, ends, w_row, h if keep_h else None, kept_w1, kept_w2)
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, token_of_row, inverse, ends, w_row, h, w1, w2 = ctx.saved_tensors
        module, counts, k = ctx.module, ctx.counts, ctx.k
        w2 = module.down.dequantize(module.triton_dequantize) if w2 is None else w2
        g = grad_out.to(w2.dtype).index_select(0, token_of_row)
        grad_a = _grouped_matmul(g, w2, ends, counts)  # gradient of the unweighted activation
        del w2, g
        w1 = module.gate_up.dequantize(module.triton_dequantize) if w1 is None else w1
        if h is None:
            h = _grouped_matmul(x.index_select(0, token_of_row), w1.transpose(1, 2), ends, counts)
        grad_h, grad_w_row = swiglu_backward_(h, grad_a, w_row)
        del grad_a
        grad_xs = _grouped_matmul(grad_h, w1, ends, counts)
        del w1, grad_h, h
        grad_x = gather_sum(grad_xs, inverse, k)
        grad_w = grad_w_row.index_select(0, inverse).view(x.shape[0], k)
        return grad_x.to(ctx.hidden_dtype), grad_w.to(ctx.weights_dtype), None, None, None


class Quant4bitExperts(nn.Module):
    """Drop-in replacement for transformers' fused experts (``MixtralExperts`` and kin) with
    NF4 weights. ``forward(hidden_states, top_k_index, top_k_weights)`` as the original.

    ``keep_activations``: save the gate/up activations for the backward pass (fastest; right
    under whole-layer gradient checkpointing, where they live only during the recompute).
    Off, the backward recomputes them and a layer keeps only its input (right with
    :func:`phyassist.models.mixtral4bit.checkpointing.checkpoint_attention_only`).
    ``dequantize``: ``triton`` (the kit's kernel where Triton runs) or ``bitsandbytes`` (its own
    kernel; the benchmark's comparison).
    """

    def __init__(self, experts: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None, keep_activations: bool = True, gemm: str = "grouped",
                 dequantize: str = "triton"):
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
        self.keep_activations = keep_activations
        self.keep_weights = False  # see keep_dequantized_weights
        if gemm not in EXPERT_GEMMS:
            raise ValueError(f"Quant4bitExperts: gemm must be one of {', '.join(EXPERT_GEMMS)}, got {gemm!r}")
        self.gemm = gemm
        if dequantize not in ("triton", "bitsandbytes"):
            raise ValueError(f"Quant4bitExperts: dequantize must be triton or bitsandbytes, got {dequantize!r}")
        self.triton_dequantize = dequantize == "triton"

        # Generation settings (decode_max_rows, decode_kernel, ...): decode.DECODE_DEFAULTS says what each does.
        for name, value in DECODE_DEFAULTS.items():
            setattr(self, f"decode_{name}", value)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the experts compute in: their input is rounded to it (see
        :func:`phyassist.models.mixtral4bit.checkpointing.attention_half`)."""
        return self.gate_up.quant_state.dtype

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if not torch.is_grad_enabled() and top_k_index.numel() <= self.decode_max_rows:
            if not hidden_states.is_cuda or kernel_fits(self, hidden_states):
                return routed_experts(self, hidden_states, top_k_index, top_k_weights)
        return _MoEExperts.apply(hidden_states, top_k_weights, top_k_index, self, self.keep_activations)

    def nbytes(self) -> int:
        return self.gate_up.nbytes() + self.down.nbytes()


def keep_dequantized_weights(model: nn.Module, layers: int) -> None:
    """Let the last ``layers`` expert blocks save their dequantized weights for the backward
    (``model.quant.keep_dequantized_layers``).

    Memory for time: the frozen 4-bit weights are otherwise dequantized twice a step, once in the
    forward and once in the backward (2.6 GiB of bf16 per Mixtral-8x7B layer; the time it saves:
    bench/finetune_mixtral.md). Right where memory is left over, e.g. one 80 GB GPU without
    checkpointing; under whole-layer checkpointing the saved weights live only during a layer's
    recompute. Which layers keep them does not change the peak, all being held at the end of the
    forward.
    """
    blocks = [m for m in model.modules() if isinstance(m, Quant4bitExperts)]
    if layers > len(blocks):
        raise ValueError(f"model.quant.keep_dequantized_layers={layers}, but the model has "
                         f"{len(blocks)} 4-bit expert blocks (experts_method: grouped)")
    for i, m in enumerate(blocks):
        m.keep_weights = i >= len(blocks) - layers


def iter_fused_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules holding fused 3-D expert parameters that are still floating point."""
    for name, mod in model.named_modules():
        params = [getattr(mod, p, None) for p in EXPERT_PARAMS]
        if all(isinstance(p, nn.Parameter) and p.dim() == 3 and p.is_floating_point() for p in params):
            yield name, mod


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _parametrize(mod: nn.Module, quant_type: str, double_quant: bool) -> None:
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    for p in EXPERT_PARAMS:
        replace_parameter_4bit(mod, p, compress_statistics=double_quant, quant_type=quant_type)


def quantize_moe_experts(model: nn.Module, quant_cfg, method: str = "parametrize", **kwargs) -> int:
    """Quantize every fused expert tensor of ``model`` to 4 bit in place; returns how many
    expert modules were converted. ``method``: ``grouped`` (our module, ``kwargs`` go to
    :class:`Quant4bitExperts`) or ``parametrize``."""
    compute = torch_dtype(quant_cfg.compute_dtype)
    done = 0
    for name, mod in list(iter_fused_experts(model)):
        if method == "parametrize":
            _parametrize(mod, quant_cfg.quant_type, quant_cfg.double_quant)
        elif method == "grouped":
            new = Quant4bitExperts(mod, quant_cfg.quant_type, quant_cfg.double_quant, compute,
                                   gemm=quant_cfg.expert_gemm, **kwargs)
            set_submodule(model, name, new)
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
