"""The fused SwiGLU kernels against the plain formula: the torch fallback here, the Triton
kernels in Triton's CPU interpreter (a subprocess, since TRITON_INTERPRET is read at import)."""

import pytest
import torch
from conftest import run_in_triton_interpreter

from phyassist.models.mixtral4bit.kernels import gather_sum, swiglu_backward_, swiglu_forward


def _reference(h, w, grad_a):
    h = h.detach().double().requires_grad_()
    w = w.detach().double().requires_grad_()
    inter = h.shape[1] // 2
    a_unweighted = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    a = a_unweighted * w[:, None]
    a.backward(grad_a.double())
    return a.detach(), h.grad, w.grad


def check(dtype=torch.float32, rows=37, inter=1500, atol=1e-5, device="cpu"):
    torch.manual_seed(0)
    h = torch.randn(rows, 2 * inter).to(device, dtype)
    w = torch.rand(rows, device=device)
    grad_a = torch.randn(rows, inter).to(device, dtype)
    a_ref, gh_ref, gw_ref = (t.to(device) for t in _reference(h.cpu(), w.cpu(), grad_a.cpu()))
    a = swiglu_forward(h, w)
    assert torch.allclose(a.double(), a_ref, atol=atol, rtol=1e-3), (a.double() - a_ref).abs().max()
    gh, gw = swiglu_backward_(h.clone(), grad_a, w)
    assert torch.allclose(gh.double(), gh_ref, atol=atol, rtol=1e-3), (gh.double() - gh_ref).abs().max()
    assert torch.allclose(gw.double(), gw_ref, atol=1e-3, rtol=1e-3), (gw.double() - gw_ref).abs().max()
    # a wrong kernel would fail: the routing weight really enters both outputs
    assert not torch.allclose(a.double(), a_ref / w[:, None].double(), atol=atol)


def check_gather_sum(device="cpu"):
    """Each token's k rows, gathered through a permutation and summed; bf16 sums rounded once."""
    torch.manual_seed(0)
    for k, tokens, width in [(2, 37, 1500), (1, 5, 64), (3, 9, 2100)]:
        index = torch.randperm(tokens * k).to(device)
        for dtype in (torch.float32, torch.bfloat16):
            src = torch.randn(tokens * k, width).to(device, dtype)
            ref = src.double()[index].view(tokens, k, width).sum(1).to(dtype)
            out = gather_sum(src, index, k)
            assert out.dtype == dtype and out.shape == (tokens, width)
            assert torch.allclose(out.double(), ref.double(), rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-6,
                                  atol=1e-6), (k, dtype)
            assert not torch.allclose(out.double(), src.double()[:tokens], atol=1e-3)  # it did gather


def test_torch_fallback_matches_formula():
    check()
    check(torch.bfloat16, atol=3e-2)
    check_gather_sum()


def test_triton_kernels_match_formula_in_interpreter():
    run_in_triton_interpreter("import tests.test_moe_kernels as t; t.check(); t.check_gather_sum()")


def check_dequantize(out_dtype=torch.float32, device="cpu"):
    """The NF4 kernel gives bitsandbytes' values, nested (double-quant) scales or not. In fp32 they
    must be equal; the interpreter's bf16 cast truncates where CUDA rounds, so bf16 is checked on
    GPUs (bench/finetune_mixtral.py) and here only within one bf16 step."""
    import bitsandbytes.functional as bnbf

    from phyassist.models.mixtral4bit.kernels import dequantize_nf4

    torch.manual_seed(0)
    for nested in (True, False):
        # rows a multiple of the block size (bitsandbytes-CPU mis-dequantizes blocks that straddle rows);
        # 600 blocks > 256 exercises the nested scales' second level
        for shape in [(600, 64), (2, 33 * 64), (5, 6, 128)]:
            w = torch.randn(*shape, dtype=torch.bfloat16).to(device) * 0.02
            packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
            ref = bnbf.dequantize_4bit(packed, state).float().view(shape)
            state.dtype = out_dtype
            out = dequantize_nf4(packed, state)
            assert out.shape == shape and out.dtype == out_dtype
            if out_dtype == torch.float32:
                assert torch.equal(out.to(torch.bfloat16).float(), ref), (nested, shape)
            else:
                assert torch.allclose(out.float(), ref, rtol=2 ** -7, atol=0), (nested, shape)
            assert not torch.equal(out.float(), -ref)  # a sign or nibble-order error would show


def test_dequantize_without_triton_is_bitsandbytes():
    check_dequantize()


def test_dequantize_kernel_matches_bitsandbytes_in_interpreter():
    run_in_triton_interpreter(
        "import tests.test_moe_kernels as t; t.check_dequantize(); t.check_dequantize(torch.bfloat16)")


@pytest.mark.gpu
def test_gpu_triton_kernels_match_formula_and_bitsandbytes(has_gpu):
    """The same checks with CUDA tensors (the kernels compiled for the GPU); bf16 dequantization
    must round as bitsandbytes' CUDA kernel does (within one bf16 step)."""
    check(device="cuda")
    check(torch.bfloat16, atol=3e-2, device="cuda")
    check_gather_sum("cuda")
    check_dequantize(device="cuda")
    check_dequantize(torch.bfloat16, device="cuda")
