"""The captured decode step's fused kernels (phyassist.models.fused_decode) against the modules they stand in for:
HF's RMSNorm and rotary embedding, PEFT's LoRA forward; in Triton's CPU interpreter (``make test``) and on a GPU
(``gpu``). The whole decode step with them: tests/test_generation.py's graph-decode test (gpu)."""

import functools

import pytest
import torch
from conftest import adapters_like_trained, run_in_triton_interpreter

from phyassist.config import load_config


def _close(got, want, steps, what, magnitude=None):
    """Each element within ``steps`` rounding steps (``want``'s dtype: 2^-8 relative for bf16) of its own
    ``magnitude`` (default: the element of ``want``; for a sum, the sum of its terms' sizes, since a sum that
    cancels keeps its terms' rounding), not of the largest value: a wrong rounding or scale in small elements shows."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    size = want.float().abs() if magnitude is None else magnitude.float()
    ulp = torch.finfo(want.dtype).eps * size.clamp_min(torch.finfo(torch.float32).tiny)
    err = (got.float() - want.float()).abs()
    worst = (err / ulp).max().item()
    assert worst <= steps, (what, worst)


def _steps(device, gpu, interpreter):
    """Rounding steps allowed: Triton's interpreter casts to bf16 by truncation (torch rounds to nearest), so it
    gets more than a GPU."""
    return gpu if device == "cuda" else interpreter


def check_norm(device="cpu"):
    """RMSNorm: HF's forward rounds the normalized row to the input dtype, then multiplies by the weight; with an
    fp32 weight the output is fp32 and each ``output / weight`` must be a bf16 value (the intermediate rounding);
    rows of tiny values, where ``eps`` dominates the mean of squares; rows wider than a warp's share."""
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    from phyassist.models.fused_decode import rms_norm

    g = torch.Generator().manual_seed(0)
    for d, wdtype, scale in ((64, torch.bfloat16, 3.0), (4096, torch.bfloat16, 3.0), (96, torch.float32, 3.0),
                             (128, torch.bfloat16, 1e-3)):
        norm = MixtralRMSNorm(d, eps=1e-5).to(device, wdtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(d, generator=g) * 0.5 + 1)
        x = (torch.randn(3, 5, d, generator=g) * scale).to(device, torch.bfloat16)
        with torch.no_grad():
            want = norm(x)
        got = rms_norm(x, norm.weight, norm.variance_epsilon)
        if wdtype == torch.float32:  # compare the rounded normalized rows; torch's rsqrt vs 1 / sqrt: a step apart
            h_got, h_want = got.double() / norm.weight.double(), want.double() / norm.weight.double()
            off = (h_got - h_got.to(torch.bfloat16).double()).abs() / h_got.abs().clamp_min(1e-30)
            assert off.max() <= 2 ** -20, ("the normalized row is not rounded to bf16", off.max().item())  # fp32 noise
            _close(h_got.to(torch.bfloat16), h_want.to(torch.bfloat16), 1, ("norm h", d))
        else:
            _close(got, want, _steps(device, 2, 2), ("norm", d, wdtype, scale))


def check_rotary(device="cpu"):
    """Rotary embedding on q and k as the attention passes them (transposed views of the projections), grouped
    KV heads, one and several positions, bf16: HF's three rounded ops (within two steps: the interpreter's casts
    to bf16 need not round to nearest)."""
    from transformers.models.mixtral.modeling_mixtral import apply_rotary_pos_emb

    from phyassist.models.fused_decode import apply_rotary

    g = torch.Generator().manual_seed(1)
    for b, s, hq, hk, d in ((1, 1, 8, 2, 64), (3, 4, 4, 4, 32)):
        q = torch.randn(b, s, hq * d, generator=g).to(device, torch.bfloat16).view(b, s, hq, d).transpose(1, 2)
        k = torch.randn(b, s, hk * d, generator=g).to(device, torch.bfloat16).view(b, s, hk, d).transpose(1, 2)
        angle = torch.rand(b, s, d // 2, generator=g) * 6
        emb = torch.cat([angle, angle], -1)
        cos, sin = emb.cos().to(device, torch.bfloat16), emb.sin().to(device, torch.bfloat16)
        want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
        got_q, got_k = apply_rotary(q, k, cos, sin)
        def size(t):  # |t * cos| + |rotate_half(t) * sin|
            half = t.shape[-1] // 2
            turned = torch.cat([-t[..., half:], t[..., :half]], -1)
            return (t * cos[:, None]).float().abs() + (turned * sin[:, None]).float().abs()
        size_q, size_k = size(q), size(k)
        _close(got_q, want_q, _steps(device, 1, 2), ("rotary q", b, s, hq, d), size_q)
        _close(got_k, want_k, _steps(device, 1, 2), ("rotary k", b, s, hk, d), size_k)


def check_lora(device="cpu"):
    """``y += s * B(A(x))`` against the same maths in fp64 (``x`` rounded to the adapter's dtype first, as PEFT casts
    it; products summed unrounded, one rounding to ``y``'s dtype): adapters in fp32 and bf16, an fp32 input to a bf16
    adapter (whether ``x`` is rounded first moves a bf16 output by at most a step: not told apart here), a rank not a
    power of two, columns past a tile."""
    from phyassist.models.fused_decode import lora_add_

    g = torch.Generator().manual_seed(2)
    for rows, K, N, r, xdtype, adtype in ((1, 512, 200, 32, torch.bfloat16, torch.float32),
                                          (5, 1000, 130, 12, torch.bfloat16, torch.bfloat16),
                                          (3, 256, 64, 8, torch.float32, torch.bfloat16)):
        x = torch.randn(rows, K, generator=g).to(device, xdtype)
        y = torch.randn(rows, N, generator=g).to(device, torch.bfloat16)
        a = (torch.randn(r, K, generator=g) * 0.05).to(device, adtype)
        b = (torch.randn(N, r, generator=g) * 0.05).to(device, adtype)
        term = 0.7 * (x.to(adtype).double() @ a.double().T) @ b.double().T
        got = lora_add_(y.clone(), x, a, b, 0.7)
        _close(got, (y.double() + term).to(torch.bfloat16), _steps(device, 1, 2),
               ("lora", rows, K, N, r, xdtype, adtype), y.double().abs() + term.abs())


def check_dense(device="cpu"):
    """The attention projections' 4-bit GEMV: a bitsandbytes NF4 weight's bytes through the routed kernel as one
    expert (split-K partial sums), against ``x @ W.T`` of the dequantized weight in fp64 (the kernel scales each quant
    block's dot product instead of rounding each weight: within bf16's rounding of the products' sizes); then the
    adapter's kernel adding the partials, rounded as the base layer rounds, and ``s * B(A(x))`` (one rounding)."""
    import bitsandbytes.functional as bnbf

    from phyassist.models.fused_decode import lora_add_partials
    from phyassist.models.mixtral4bit.decode import nf4_linear_partials

    g = torch.Generator().manual_seed(5)
    for rows, N, K, r in ((1, 200, 512, 32), (5, 64, 256, 8), (40, 130, 1024, 12)):
        w = (torch.randn(N, K, generator=g) * 0.05).to(device, torch.bfloat16)
        data, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        wd = bnbf.dequantize_4bit(data, state).double()
        x = torch.randn(rows, K, generator=g).to(device, torch.bfloat16)
        partial = nf4_linear_partials(x, data, state)
        assert partial.shape[1:] == (rows, N) and (device != "cuda" or partial.shape[0] > 1), partial.shape
        base = partial.float().sum(0)
        size = x.double().abs() @ wd.abs().T
        err = (base.double() - x.double() @ wd.T).abs()
        assert (err <= 2 ** -7 * size + 1e-6).all(), ("dense", rows, N, K, (err / size).max().item())
        a = (torch.randn(r, K, generator=g) * 0.05).to(device, torch.float32)
        b = (torch.randn(N, r, generator=g) * 0.05).to(device, torch.float32)
        term = 0.7 * (x.double() @ a.double().T) @ b.double().T
        got = lora_add_partials(partial, x, a, b, 0.7, torch.bfloat16)
        rounded = base.to(torch.bfloat16).double()
        _close(got, (rounded + term).to(torch.bfloat16), _steps(device, 1, 2), ("dense lora", rows, N, K, r),
               rounded.abs() + term.abs())


def check_router(device="cpu"):
    """Mixtral's router in one kernel against ``MixtralTopKRouter``: the logits within bf16's rounding of the
    products' sizes; from the kernel's logits, torch's softmax, top-2 and renormalization give the same experts and
    weights (so a logit a step off cannot hide a wrong softmax or order); the adapted weight against PEFT's formula
    ``W + (B @ A * s).to(W.dtype)``."""
    from types import SimpleNamespace

    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    from phyassist.models.fused_decode import router_top_k, router_weight

    g = torch.Generator().manual_seed(6)
    for rows, K, E, k in ((1, 256, 8, 2), (7, 2048, 8, 2), (3, 128, 4, 1), (2, 128, 6, 2)):
        router = MixtralTopKRouter(SimpleNamespace(num_experts_per_tok=k, num_local_experts=E, hidden_size=K))
        with torch.no_grad():
            router.weight.copy_(torch.randn(E, K, generator=g) * 0.3)
        router = router.to(device, torch.bfloat16)
        x = torch.randn(rows, K, generator=g).to(device, torch.bfloat16)
        with torch.no_grad():
            want_logits, _, _ = router(x)
        logits, values, index = router_top_k(x, router.weight, k)
        _close(logits, want_logits, _steps(device, 1, 2), ("router logits", rows, K, E),
               x.float().abs() @ router.weight.float().abs().T)
        probs = torch.softmax(logits.float(), -1)
        top, idx = torch.topk(probs, k, -1)
        assert torch.equal(index, idx), (index, idx)
        assert torch.allclose(values, top / top.sum(-1, keepdim=True), rtol=1e-5, atol=0), (values, top)
        assert values.dtype == torch.float32 and index.dtype == torch.int64 and logits.dtype == torch.bfloat16
        bias = -1.2 * torch.log(torch.arange(1, E + 1, dtype=torch.float32)).to(device)  # the benchmarks' skew
        logits_b, values_b, index_b = router_top_k(x, router.weight, k, bias)
        _close(logits_b, (want_logits + bias.to(torch.bfloat16)), _steps(device, 1, 2), ("router bias", rows, K),
               x.float().abs() @ router.weight.float().abs().T + bias.abs())
        top_b, idx_b = torch.topk(torch.softmax(logits_b.float(), -1), k, -1)
        assert torch.equal(index_b, idx_b) and torch.allclose(values_b, top_b / top_b.sum(-1, keepdim=True), rtol=1e-5)
        zero_logits, _, _ = router_top_k(torch.zeros_like(x), router.weight, k, bias)  # the bias alone, rounded once:
        _close(zero_logits, bias.to(torch.bfloat16).expand_as(zero_logits).contiguous(),  # bit-equal on a GPU
               _steps(device, 0, 1), ("router bias alone", E))
        _, nan_values, nan_index = router_top_k(torch.full_like(x, float("nan")), router.weight, k)
        assert nan_index.min() >= 0 and nan_index.max() < E and len(set(nan_index[0].tolist())) == k, nan_index
        r = 12
        a = (torch.randn(r, K, generator=g) * 0.05).to(device)
        b = (torch.randn(E, r, generator=g) * 0.05).to(device)
        delta = ((b @ a) * 0.5).to(torch.bfloat16)
        want_w = router.weight + delta
        _close(router_weight(router.weight, a, b, 0.5), want_w, _steps(device, 1, 2), ("router weight", K, E),
               router.weight.float().abs() + delta.float().abs())


def _tiny_study_model(device):
    """The tiny Mixtral built layer by layer into 4 bit with the study's quantization and LoRA (router included;
    its dropout passes x through in eval mode), in eval mode."""
    from phyassist.models.mixtral4bit.build import build_quantized_model
    from phyassist.models.registry import architecture_config
    from phyassist.train.lora import apply_lora

    cfg = load_config("paper")
    config = architecture_config("tiny-mixtral")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = build_quantized_model(config, cfg.model.quant, device, method="grouped", progress=False)
    return apply_lora(model, cfg.train.lora).eval()


def check_model(device="cpu"):
    """The tiny Mixtral in 4 bit with the study's LoRA (router included) one decode step with and without
    :func:`fused_decode`: the same logits within bf16 rounding; counts that every fused kernel ran (norms, rotary,
    the 4-bit q/k/v/o with their adapters, the adapted routers, the decode step's attention and cache update); after
    the context every module runs its own forward again, and transformers' SDPA function and cache update are theirs."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from phyassist.models.fused_decode import fused_decode
    from phyassist.models.mixtral4bit.decode import configure_decode

    model = _tiny_study_model(device)
    configure_decode(model, {"max_rows": 0})  # the experts' torch path: what this test checks is around them
    for m in model.modules():  # keep bitsandbytes' GPU layout on CPUs with AVX512-BF16 (it repacks for them)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    torch.manual_seed(3)
    adapters_like_trained(model, 0.05)
    ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4)).to(device)

    def step(batch):
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(input_ids=ids[:batch, :5], past_key_values=cache, use_cache=True)
            return model(input_ids=ids[:batch, 5:], position_ids=torch.full((batch, 1), 5, device=device),
                         past_key_values=cache, use_cache=True).logits.float()

    forwards = {n: m.forward for n, m in model.named_modules()}
    want = {batch: step(batch) for batch in (2, 1)}
    import phyassist.models.decode_attention as da
    import phyassist.models.fused_decode as f

    calls = dict.fromkeys(("rms_norm", "apply_rotary", "lora_add_", "lora_add_partials", "nf4_linear_partials",
                           "router_weight", "router_top_k", "decode_attention", "cache_write"), 0)
    home = {name: da if name in ("decode_attention", "cache_write") else f for name in calls}
    originals = {name: getattr(home[name], name) for name in calls}
    min_programs, da.MIN_PROGRAMS = da.MIN_PROGRAMS, 0  # this batch of 2 would leave attention to SDPA on a GPU

    def counted(name):
        def run(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return run
    try:
        for name in calls:
            setattr(home[name], name, counted(name))
        got, counts = {}, {}
        before = (ALL_ATTENTION_FUNCTIONS["sdpa"], StaticLayer.update, dict(ALL_ATTENTION_FUNCTIONS._local_mapping))
        with fused_decode(model):
            inside = (ALL_ATTENTION_FUNCTIONS["sdpa"], StaticLayer.update)
            patched = [n for n, m in model.named_modules() if "forward" in vars(m)]
            for batch in (2, 1):
                got[batch] = step(batch)
                counts[batch] = dict(calls)
                calls.update(dict.fromkeys(calls, 0))
    finally:
        da.MIN_PROGRAMS = min_programs
        for name, fn in originals.items():
            setattr(home[name], name, fn)
    layers = model.config.num_hidden_layers
    # the decode step's 2 norms a layer and the final one, a rotary embedding, q, k, v, o's 4-bit GEMVs with their
    # adapters and the adapted router a layer (the prefill inside step() runs them too: twice each); at batch 1 the
    # decode step's projections stay on bitsandbytes' GEMV (DENSE_MIN_ROWS), their adapters on lora_add_
    same = {"rms_norm": 2 * (2 * layers + 1), "apply_rotary": 2 * layers, "router_weight": 2 * layers,
            "router_top_k": 2 * layers, "decode_attention": layers, "cache_write": layers}  # attention: decode only
    assert counts[2] == dict(same, lora_add_=0, lora_add_partials=2 * 4 * layers,
                             nf4_linear_partials=2 * 4 * layers), counts[2]
    assert counts[1] == dict(same, lora_add_=4 * layers, lora_add_partials=4 * layers,
                             nf4_linear_partials=4 * layers), counts[1]
    assert any("norm" in n for n in patched) and any("q_proj" in n for n in patched), patched
    assert any(n.endswith("mlp.gate") for n in patched), patched  # the router's adapter wrapper
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(m.forward == forwards[n] for n, m in model.named_modules())
    assert inside[0].phyassist_wraps is before[0] and inside[1].phyassist_wraps is before[1]
    assert (ALL_ATTENTION_FUNCTIONS["sdpa"], StaticLayer.update, ALL_ATTENTION_FUNCTIONS._local_mapping) == before
    for batch in (2, 1):
        rel = ((got[batch] - want[batch]).abs().amax(-1) / want[batch].abs().amax()).flatten()
        assert (rel <= 0.02).all(), (batch, rel.tolist())
    # the benchmarks' skewed router (a logit bias that forces experts 0 and 1): the fused router adds it too
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    from bench.router_skew import set_skew
    try:
        set_skew(model, 50.0)
        want_skew = step(2)
        with fused_decode(model):
            got_skew = step(2)
    finally:  # the class's own forward back (set_skew patches it process-wide)
        MixtralTopKRouter.forward = MixtralTopKRouter.__dict__["_phy_plain_forward"]
        del MixtralTopKRouter._phy_plain_forward
        for m in model.modules():
            m.__dict__.pop("logit_bias", None)
    assert ((want_skew - want[2]).abs().amax(-1) / want[2].abs().amax()).min() > 0.05  # the skew moves the output
    rel = ((got_skew - want_skew).abs().amax(-1) / want_skew.abs().amax()).flatten()
    assert (rel <= 0.02).all(), ("skewed", rel.tolist())


def test_fused_decode_kernels_match_the_modules_in_triton_interpreter():
    run_in_triton_interpreter("import tests.test_fused_decode as t; t.check_norm(); t.check_rotary(); "
                              "t.check_lora(); t.check_dense(); t.check_router(); t.check_model()")


def test_without_triton_nothing_is_patched(monkeypatch):
    """CPU builds of torch: the context changes nothing (with Triton it patches the same model's norm)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    from phyassist.models import fused_decode as f

    model = torch.nn.Sequential(MixtralRMSNorm(8), torch.nn.Linear(8, 8))
    if f.triton is not None:
        with f.fused_decode(model):
            assert "forward" in vars(model[0])
    monkeypatch.setattr(f, "triton", None)
    with f.fused_decode(model):
        assert not any("forward" in vars(m) for m in model.modules())


def test_a_modules_own_forward_comes_back_and_nesting_restores_each_level():
    """A module's own ``forward``: the fused forward falls back to it and it comes back on exit; a nested context
    restores the outer one's patch, the outer the original, the rotary function too; a module under an accelerate
    hook is not patched."""
    pytest.importorskip("triton")
    import transformers.models.mixtral.modeling_mixtral as mm
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    from phyassist.models.fused_decode import fused_decode

    norm = MixtralRMSNorm(8)
    hooked = lambda x: x * 2  # noqa: E731 - a forward of the instance's own
    norm.forward = hooked
    model = torch.nn.Sequential(norm)
    rotary = mm.apply_rotary_pos_emb
    with fused_decode(model):
        outer, outer_rotary = norm.forward, mm.apply_rotary_pos_emb
        assert outer is not hooked and torch.equal(norm(torch.ones(8)), torch.full((8,), 2.0))  # CPU: falls back
        assert outer_rotary is not rotary
        with fused_decode(model):
            assert norm.forward is not outer and mm.apply_rotary_pos_emb is not outer_rotary
        assert norm.forward is outer and mm.apply_rotary_pos_emb is outer_rotary
    assert norm.forward is hooked and mm.apply_rotary_pos_emb is rotary
    norm._hf_hook = object()  # accelerate's device hook: left alone
    with fused_decode(model):
        assert norm.forward is hooked
    del norm._hf_hook
    del norm.forward
    with fused_decode(model):
        pass
    assert "forward" not in vars(norm)


def test_contexts_in_two_threads_take_turns_and_a_failed_patch_leaves_nothing(monkeypatch):
    """The process-wide patches (attention function, cache update, rotary): a context opened in another thread waits
    for the open one to close, so each puts back what it found; a patch that fails half-way is undone and the lock
    released."""
    pytest.importorskip("triton")
    import threading

    from transformers.cache_utils import StaticLayer
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import phyassist.models.fused_decode as fd

    sdpa, update = ALL_ATTENTION_FUNCTIONS["sdpa"], StaticLayer.__dict__["update"]
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    seen = []

    def second():
        with fd.fused_decode(model):
            seen.append(ALL_ATTENTION_FUNCTIONS["sdpa"].phyassist_wraps)

    with fd.fused_decode(model):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive() and not seen  # waiting for this context to close
    thread.join(10)
    assert seen == [sdpa]  # it wrapped the original, not this context's wrapper
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa and StaticLayer.__dict__["update"] is update

    def broken(original):
        raise RuntimeError("no cache update today")

    import phyassist.models.decode_attention as da

    monkeypatch.setattr(da, "static_layer_update", broken)
    with pytest.raises(RuntimeError, match="no cache update"):
        with fd.fused_decode(model):
            pass
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa and StaticLayer.__dict__["update"] is update
    assert fd._PATCHING.acquire(blocking=False)  # released
    fd._PATCHING.release()


def test_only_routers_with_mixtrals_maths_are_fused(monkeypatch):
    """A router class whose forward was replaced keeps it (the fused kernel would drop what it adds), unless the
    forward declares itself Mixtral's maths plus the router's ``logit_bias`` (the benchmarks' skewed router)."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    from phyassist.models.fused_decode import fused_decode

    cfg = SimpleNamespace(num_experts_per_tok=2, num_local_experts=4, hidden_size=8)

    class Patched(MixtralTopKRouter):
        def forward(self, hidden_states):
            return super().forward(hidden_states * 2)

    class Declared(MixtralTopKRouter):
        def forward(self, hidden_states):
            return super().forward(hidden_states)
    Declared.forward._phyassist_logit_bias = True

    model = torch.nn.ModuleList([MixtralTopKRouter(cfg), Patched(cfg), Declared(cfg)])
    with fused_decode(model):
        assert ["forward" in vars(m) for m in model] == [True, False, True]
    with fused_decode(model, parts=("norm",)):
        assert not any("forward" in vars(m) for m in model)
    own = MixtralTopKRouter.forward

    @functools.wraps(own)
    def wrapped(self, hidden_states):  # a wrapper carries the name and module of what it wraps
        return own(self, hidden_states * 2)

    def replaced(self, hidden_states):
        return own(self, hidden_states * 2)
    for patch in (wrapped, replaced):
        monkeypatch.setattr(MixtralTopKRouter, "forward", patch)
        with fused_decode(model):
            assert "forward" not in vars(model[0]), patch
    monkeypatch.undo()


@pytest.mark.gpu
def test_gpu_fused_decode_kernels_match_the_modules(has_gpu):
    check_norm("cuda")
    check_rotary("cuda")
    check_lora("cuda")
    check_dense("cuda")
    check_router("cuda")
    check_model("cuda")


def test_fused_paths_take_only_the_cases_they_compute(monkeypatch):
    """The eligibility checks on the tiny 4-bit Mixtral with the study's LoRA (as if on a GPU: ``_fusable`` forced):
    one plain active adapter is fused; per-row adapter names, dropout in training mode, disabled, merged or two active
    adapters fall back to the modules' own forward; the router's adapter the same and a mismatched input dtype; the
    4-bit GEMV from 2 rows, not under a hook."""
    import copy

    import phyassist.models.fused_decode as f

    model = _tiny_study_model("cpu")
    config = model.config
    monkeypatch.setattr(f, "_fusable", lambda x: True)
    q = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    gate = model.get_submodule("base_model.model.model.layers.0.mlp.gate")
    x = torch.zeros(2, config.hidden_size, dtype=torch.bfloat16)
    assert f._plain_adapter(q, x, (), {}) == "default" and f._router_adapter(gate, x, (), {}) == "default"
    assert f._plain_adapter(q, x, (), {"adapter_names": ["default"] * 2}) is None
    assert f._router_adapter(gate, x.float(), (), {}) is None
    model.train()  # the study's dropout (0.05) is active in training mode
    assert f._plain_adapter(q, x, (), {}) is None
    model.eval()
    with model.disable_adapter():
        assert f._plain_adapter(q, x, (), {}) is None and f._router_adapter(gate, x, (), {}) is None
    for layer in (q, gate):
        layer.merged_adapters.append("default")
        assert (f._plain_adapter if layer is q else f._router_adapter)(layer, x, (), {}) is None
        layer.merged_adapters.remove("default")
    model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
    model.base_model.set_adapter(["default", "other"])
    assert f._plain_adapter(q, x, (), {}) is None and f._router_adapter(gate, x, (), {}) is None
    base = q.get_base_layer()
    assert f._nf4_ready(base, x) and not f._nf4_ready(base, x[:1])
    handle = base.register_forward_hook(lambda *a: None)
    assert not f._nf4_ready(base, x)
    handle.remove()
