"""The kit's generation path (phyassist.models.generation) against transformers' ``generate`` over the
training path's experts, and the routed NF4 expert kernel against the dequantized reference.
CPU tests run in ``make test``; ``gpu`` tests run on a CUDA machine (bench/gpu_tests.md)."""

import copy

import pytest
import torch
from conftest import adapters_like_trained, run_in_triton_interpreter

from phyassist.config import load_config
from phyassist.models.generation import _adapter_state, generate


@pytest.fixture(scope="module")
def tiny_mixtral_lora():
    """The tiny random Mixtral in 4 bit (the kit's fused experts) with the study's LoRA incl. the router,
    adapter weights non-zero so that they change the output."""
    from phyassist.models.loading import load_model
    from phyassist.train.lora import apply_lora

    cfg = load_config("smoke", {"model.name": "tiny-mixtral", "model.quant.experts_method": "grouped"})
    model = load_model(cfg.model, for_training=False)
    lcfg = cfg.train.lora.model_copy(update={"target_router": True, "dropout": 0.0})
    peft = apply_lora(model, lcfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)
    return peft.eval()


def _experts(model):
    return [m for m in model.modules() if hasattr(m, "decode_max_rows")]


def _left_padded_prompts(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_static_path_gives_the_reference_greedy_tokens(tiny_mixtral_lora):
    """64 greedy tokens, left-padded batch, adapter on: the static-cache path with routed experts
    equals transformers' generate with every expert dequantized (the kit's path before)."""
    model = tiny_mixtral_lora
    experts = _experts(model)
    assert experts, "the tiny Mixtral should carry the kit's 4-bit experts"
    ids, mask = _left_padded_prompts(model.config.vocab_size)
    for m in experts:
        m.decode_max_rows = 0  # reference: the training path's experts
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    for m in experts:
        m.decode_max_rows = 16
    events = []
    out = generate(model, ids, mask, max_new_tokens=64, pad_token_id=0, static=True, step_events=events)
    assert ref.shape == out.shape == (2, 74)
    assert torch.equal(out, ref)
    assert events == []  # timing events are recorded on CUDA only


def test_static_path_follows_generate_with_penalty_stop_and_streamer(tiny_mixtral_lora):
    """The app's call: repetition penalty, a logits processor, a stopping criterion and a streamer."""
    from transformers import LogitsProcessor, StoppingCriteria

    model = tiny_mixtral_lora
    ids, _ = _left_padded_prompts(model.config.vocab_size, seed=3)
    ids = ids[:1]

    class Ban(LogitsProcessor):  # forbids one token, as the app's format guard forbids some
        def __call__(self, input_ids, scores):
            scores[:, 7] = -float("inf")
            return scores

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 10 + 20, dtype=torch.bool)

    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    kw = dict(max_new_tokens=40, do_sample=False, repetition_penalty=1.3, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, logits_processor=[Ban()], stopping_criteria=[StopAfter()], **kw)
    stream = Collect()
    out = generate(model, ids, logits_processor=[Ban()], stopping_criteria=[StopAfter()], streamer=stream,
                   static=True, **kw)
    assert torch.equal(out, ref) and out.shape[1] == 30
    assert stream.ended and torch.equal(stream.puts[0], ids)  # the prompt first, as generate does
    assert torch.equal(torch.cat([p.view(-1) for p in stream.puts[1:]]), out[0, 10:])


def test_eos_ends_rows_and_trims_like_generate(tiny_mixtral_lora):
    model = tiny_mixtral_lora
    ids, mask = _left_padded_prompts(model.config.vocab_size, seed=5)
    with torch.inference_mode():
        probe = generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, static=True)
    eos = int(probe[0, 10 + 3])  # a token row 0 emits early: treat it as end of sequence
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    out = generate(model, ids, mask, static=True, **kw)
    assert torch.equal(out, ref)


def test_graph_key_follows_adapter_state(tiny_mixtral_lora):
    """A captured graph must never replay another adapter: the key sees switches and disabling."""
    model = tiny_mixtral_lora
    before = _adapter_state(model)
    with model.disable_adapter():
        disabled = _adapter_state(model)
    assert disabled != before and _adapter_state(model) == before
    other = copy.deepcopy(model)
    assert _adapter_state(other) != before  # other storage: another graph
    experts = _experts(model)
    experts[0].decode_split_bytes += 1  # other kernels: another graph
    assert _adapter_state(model) != before
    experts[0].decode_split_bytes -= 1
    for name, value in (("decode_kernel", "gemv2"), ("decode_lut", "pair"), ("decode_gemv_rows", 64)):
        old = getattr(experts[0], name)
        assert old != value, name
        setattr(experts[0], name, value)  # the kernel switches pick other kernels too
        assert _adapter_state(model) != before, name
        setattr(experts[0], name, old)
    assert _adapter_state(model) == before


def test_decoder_cache_separates_fused_and_unfused_graphs(tiny_mixtral_lora):
    """A graph captured with the fused kernels (phyassist.models.fused_decode), one without and one with some of
    them are different decoders; switching back finds the first again; an unknown part is named."""
    from phyassist.models.fused_decode import FUSED_PARTS
    from phyassist.models.generation import _decoder

    model = tiny_mixtral_lora
    fused = _decoder(model, 1, 10, use_graph=False)
    try:
        model.phyassist_fused_decode = False
        plain = _decoder(model, 1, 10, use_graph=False)
        model.phyassist_fused_decode = ["rotary", "norm"]
        some = _decoder(model, 1, 10, use_graph=False)
        assert plain is not fused and not plain.fused and fused.fused == FUSED_PARTS
        assert some is not fused and some is not plain and some.fused == ("norm", "rotary")
        model.phyassist_fused_decode = ["norms"]
        with pytest.raises(ValueError, match="norms"):
            _decoder(model, 1, 10, use_graph=False)
    finally:
        del model.phyassist_fused_decode
    assert _decoder(model, 1, 10, use_graph=False) is fused


def test_cpu_default_keeps_transformers_generate(tiny_mixtral_lora, monkeypatch):
    """On a CPU the default is transformers' generate (the dynamic cache attends over fewer keys)."""
    model = tiny_mixtral_lora
    called = []
    monkeypatch.setattr(type(model), "generate", lambda self, **kw: called.append(kw) or kw["input_ids"])
    ids, mask = _left_padded_prompts(model.config.vocab_size)
    generate(model, ids, mask, max_new_tokens=2)
    assert called and called[0]["max_new_tokens"] == 2


def check_routed(device="cpu", dtype=torch.float32, hidden=256, inter=1024, experts=4, atol=1e-5, split=128):
    """Routed NF4 experts == the training path's experts (dequantize all, grouped GEMM)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from phyassist.models.mixtral4bit.decode import routed_experts
    from phyassist.models.mixtral4bit.experts import Quant4bitExperts

    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                        num_experts_per_tok=2)
    torch.manual_seed(0)
    ex = MixtralExperts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.05)
        ex.down_proj.normal_(0, 0.05)
    for nested in (True, False):
        q = Quant4bitExperts(ex.to(device), compute_dtype=dtype, double_quant=nested)
        for tokens in (1, 5):
            x = torch.randn(tokens, hidden, device=device, dtype=dtype)
            w, idx = torch.softmax(torch.randn(tokens, experts, device=device), -1).topk(2, -1)
            w = w / w.sum(-1, keepdim=True)
            with torch.inference_mode():
                q.decode_max_rows = 0
                ref = q(x, idx, w)
                q.decode_split_bytes = split  # 128: K split in 4 (down), 1 (gate/up)
                out = routed_experts(q, x, idx, w)
                q.decode_split_bytes = 0  # the GEMV over all of K in one program
                whole = routed_experts(q, x, idx, w)
                q.decode_split_bytes = split
            for got in (out, whole):
                err = (got.float() - ref.float()).abs().max().item()
                assert err <= atol * max(1.0, ref.abs().max().item()), (nested, tokens, err)


def test_routed_experts_match_the_training_path():
    check_routed()


def test_routed_kernel_matches_in_triton_interpreter():
    run_in_triton_interpreter("import tests.test_generation as t; t.check_routed()")


@pytest.mark.gpu
def test_gpu_routed_kernel_matches_at_mixtral_width(has_gpu):
    """Mixtral-8x7B's expert shapes (4,096 -> 2 x 14,336 -> 4,096, 8 experts) in bf16."""
    check_routed("cuda", torch.bfloat16, hidden=4096, inter=14336, experts=8, atol=2e-2)
    check_routed("cuda", torch.bfloat16, hidden=4096, inter=14336, experts=8, atol=2e-2, split=512)


@pytest.mark.gpu
@pytest.mark.parametrize("decoding", ["defaults", "prmt", "attention"])
@pytest.mark.parametrize("width", ["tiny", "mixtral"])
def test_gpu_graph_decode_logits_agree_with_a_full_forward(has_gpu, width, decoding, monkeypatch):
    """Each generated step's logits (static cache, CUDA graph, routed experts) against one forward over
    the whole generated sequence with the training path's experts, within bf16 tolerance; the study's
    LoRA attached (router included). ``mixtral``: 2 layers of Mixtral-8x7B's full width. ``prmt``: the
    register decoding from 1 row (``prmt_rows`` 1; the default, 2, already decodes this test's batch of 2 by byte
    permutes), its PTX built while the first graph is captured. ``attention``: the decode step's attention in the
    fused kernel (phyassist.models.decode_attention) at this batch of 2, which by default leaves it to SDPA (too few
    programs). All capture the step with the fused norm, rotary, LoRA, router and 4-bit projection kernels
    (phyassist.models.fused_decode)."""
    import phyassist.models.decode_attention as da

    from transformers import LogitsProcessor

    from phyassist.models.mixtral4bit.build import build_quantized_model
    from phyassist.models.registry import architecture_config
    from phyassist.train.lora import apply_lora

    cfg = load_config("paper")
    config = architecture_config("tiny-mixtral" if width == "tiny" else cfg.model.name)
    config.num_hidden_layers = 2
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = build_quantized_model(config, cfg.model.quant, "cuda", method="grouped", progress=False)
    model = apply_lora(base, cfg.train.lora.model_copy(update={"dropout": 0.0})).eval()
    if decoding == "prmt":
        from phyassist.models.mixtral4bit.decode import configure_decode

        configure_decode(model, {"prmt_rows": 1})
    attended = []  # counted in every case: the defaults' batch of 2 must stay on SDPA
    kernel = da.decode_attention
    monkeypatch.setattr(da, "decode_attention", lambda *a, **k: attended.append(1) or kernel(*a, **k))
    if decoding == "attention":
        monkeypatch.setattr(da, "MIN_PROGRAMS", 0)
    adapters_like_trained(model, 0.02)
    ids, mask = _left_padded_prompts(model.config.vocab_size)
    ids, mask = ids.cuda(), mask.cuda()
    seen = []

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(scores.clone())
            return scores

    events = []
    out = generate(model, ids, mask, max_new_tokens=64, pad_token_id=0, eos_token_id=None,
                   logits_processor=[Record()], step_events=events)
    assert model.__dict__["_phyassist_decoders"], "the CUDA path captured no graph"
    assert (len(attended) > 0) == (decoding == "attention"), len(attended)  # captured: called while capturing only
    torch.cuda.synchronize()
    assert len(events) == 64 and events[0].elapsed_time(events[-1]) > 0  # after the prefill and 63 decode steps
    full_mask = torch.cat([mask, torch.ones_like(out[:, ids.shape[1]:])], 1)
    for m in _experts(model):
        m.decode_max_rows = 0
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # as generate: left padding shifts positions
    with torch.inference_mode():
        ref = model(input_ids=out, attention_mask=full_mask, position_ids=positions).logits.float()
    got = torch.stack(seen, 1)  # [batch, 64, vocab]
    want = ref[:, ids.shape[1] - 1:-1]
    # bf16 sums in another order can flip a near-tied top-2 expert choice (random routers, even scaled, leave some):
    # the positions after such a flip differ a lot, so the bound is on most positions, not every one
    scale = want.abs().amax()
    per_position = (got - want).abs().amax(-1) / scale  # [batch, 64]
    assert per_position.median() <= 0.03, per_position  # a few bf16 steps of the largest logit
    assert (per_position <= 0.05).float().mean() >= 0.85, per_position
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85
