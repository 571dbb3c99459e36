"""Mixtral path on the CPU with the tiny random Mixtral: experts really in 4 bit, outputs equal
to a dequantized reference, the study's LoRA count, the layer split and the dry run."""

import copy
import subprocess
import sys

import pytest
import torch

from phyassist.config import load_config
from phyassist.models.mixtral4bit.experts import (Quant4bitExperts, iter_fused_experts, quantize_moe_experts,
                                                sixteen_bit_weights)
from phyassist.models.registry import architecture_config


def _experts_and_routing(seed=0, tokens=12):
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = architecture_config("tiny-mixtral")
    torch.manual_seed(seed)
    ex = MixtralExperts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.05)
        ex.down_proj.normal_(0, 0.05)
    x = torch.randn(tokens, cfg.hidden_size)
    logits = torch.randn(tokens, cfg.num_local_experts)
    w, idx = torch.softmax(logits, -1).topk(cfg.num_experts_per_tok, -1)
    return cfg, ex, x, idx, w / w.sum(-1, keepdim=True)


def _dequantized_reference(ex, qmod):
    ref = copy.deepcopy(ex)
    with torch.no_grad():
        ref.gate_up_proj.copy_(qmod.gate_up.dequantize())
        ref.down_proj.copy_(qmod.down.dequantize())
    return ref


def _quant_cfg():
    return load_config("smoke").model.quant


@pytest.mark.parametrize("keep", [True, False])
def test_grouped_experts_match_dequantized_reference(keep):
    cfg, ex, x, idx, w = _experts_and_routing()
    q = Quant4bitExperts(ex, compute_dtype=torch.float32, keep_activations=keep)
    ref = _dequantized_reference(ex, q)
    xr, xq = x.clone().requires_grad_(), x.clone().requires_grad_()
    wr, wq = w.clone().requires_grad_(), w.clone().requires_grad_()
    out_ref, out_q = ref(xr, idx, wr), q(xq, idx, wq)
    assert torch.allclose(out_q, out_ref, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(out_ref)
    out_ref.backward(g)
    out_q.backward(g)
    assert torch.allclose(xq.grad, xr.grad, atol=1e-5, rtol=1e-4)
    # the routing weights' gradient reaches the router (and its LoRA) too
    assert torch.allclose(wq.grad, wr.grad, atol=1e-5, rtol=1e-4)
    # and 4-bit really differs from the original bf16/fp32 weights (quantization happened)
    assert not torch.allclose(ex(x, idx, w), out_ref, atol=1e-7)


def test_expert_gemm_setting_reaches_the_experts_and_both_agree():
    """model.quant.expert_gemm picks the GPU GEMM (per expert, or torch's grouped one); off a GPU
    both run the per-expert loop, an expert given no token included, with the same result."""
    from phyassist.config import ConfigError

    cfg, ex, x, idx, w = _experts_and_routing(tokens=6)
    idx = idx.clamp(max=cfg.num_local_experts - 2)  # the last expert gets no row
    outs = []
    for gemm in ("per_expert", "grouped"):
        quant = load_config("smoke", {"model.quant.expert_gemm": gemm}).model.quant
        model = torch.nn.ModuleDict({"experts": copy.deepcopy(ex)})
        quantize_moe_experts(model, quant, method="grouped")
        assert model["experts"].gemm == gemm
        outs.append(model["experts"](x, idx, w))
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ConfigError, match="expert_gemm"):
        load_config("smoke", {"model.quant.expert_gemm": "cutlass"})
    with pytest.raises(ValueError, match="must be one of"):
        Quant4bitExperts(ex, gemm="cutlass")


def _grouped_mm_reference(x, w, offs):
    """torch's grouped GEMM semantics on the CPU: group e is rows [offs[e-1], offs[e])."""
    out = torch.full((x.shape[0], w.shape[-1]), float("nan"), dtype=x.dtype)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w[e]
        start = end
    return out


def test_grouped_gemm_path_matches_the_per_expert_loop(monkeypatch):
    """expert_gemm=grouped (torch's grouped GEMM over group ends, no host read of the counts) gives
    the per-expert loop's outputs and gradients; run on the CPU with a reference grouped GEMM."""
    import phyassist.models.mixtral4bit.experts as Q

    cfg, ex, x, idx, w = _experts_and_routing(tokens=20)
    idx[:, 0] = idx[:, 0].clamp(max=1)  # uneven groups, one expert with few rows
    runs = []
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", _grouped_mm_reference, raising=False)
    monkeypatch.setattr(Q, "uses_grouped_mm", lambda t: True)
    reads, host_counts = [], Q._host_counts

    def counted(ends):
        reads.append(1)
        return host_counts(ends)
    monkeypatch.setattr(Q, "_host_counts", counted)
    for gemm in ("per_expert", "grouped"):
        q = Quant4bitExperts(ex, compute_dtype=torch.float32, keep_activations=False, gemm=gemm)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = q(xg, idx, wg)
        out.backward(torch.ones_like(out))
        runs.append((out, xg.grad, wg.grad))
    assert len(reads) == 1  # the per-expert loop read the counts; the grouped GEMM did not
    for a, b in zip(*runs):
        assert torch.isfinite(b).all()
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_parametrize_experts_match_dequantized_reference():
    cfg, ex, x, idx, w = _experts_and_routing(seed=1)
    holder = torch.nn.Module()
    holder.experts = copy.deepcopy(ex)
    assert quantize_moe_experts(holder, _quant_cfg(), method="parametrize") == 1
    qex = holder.experts
    assert qex.parametrizations.gate_up_proj.original.dtype == torch.uint8
    ref = copy.deepcopy(ex)
    with torch.no_grad():
        ref.gate_up_proj.copy_(qex.gate_up_proj)
        ref.down_proj.copy_(qex.down_proj)
    assert torch.allclose(qex(x, idx, w), ref(x, idx, w), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_mixtral_4bit():
    from phyassist.models.loading import load_model

    cfg = load_config("smoke", {"model.name": "tiny-mixtral"})
    return load_model(cfg.model, for_training=True), cfg


def test_tiny_mixtral_loads_with_no_16bit_expert_or_attention_weight(tiny_mixtral_4bit):
    model, _ = tiny_mixtral_4bit
    assert list(iter_fused_experts(model)) == []  # every fused expert tensor converted
    assert sixteen_bit_weights(model) == []
    packed = [n for n, p in model.named_parameters() if "experts" in n or "q_proj" in n]
    assert packed and all(model.get_parameter(n).dtype == torch.uint8 for n in packed)
    ids = torch.randint(0, 1000, (1, 8))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_router_lora_dropout_and_count(tiny_mixtral_4bit):
    from phyassist.train.lora import apply_lora, trainable_parameters

    model, cfg = tiny_mixtral_4bit
    lcfg = cfg.train.lora.model_copy(update={"r": 32, "alpha": 32, "dropout": 0.05, "target_router": True})
    peft = apply_lora(copy.deepcopy(model), lcfg)
    c = architecture_config("tiny-mixtral")
    h, kv = c.hidden_size, c.hidden_size // c.num_attention_heads * c.num_key_value_heads
    per_layer = 32 * ((h + h) * 2 + (h + kv) * 2) + 32 * (h + c.num_local_experts)
    assert trainable_parameters(peft) == per_layer * c.num_hidden_layers
    drops = {n: m for n, m in peft.named_modules() if n.endswith("lora_dropout.default")}
    assert any("q_proj" in n and isinstance(m, torch.nn.Dropout) and m.p == 0.05 for n, m in drops.items())
    assert not any("gate" in n and isinstance(m, torch.nn.Dropout) for n, m in drops.items())
    peft.train()
    out = peft(input_ids=torch.randint(0, 1000, (2, 8)), labels=torch.randint(0, 1000, (2, 8)))
    out.loss.backward()
    router_grads = [p.grad for n, p in peft.named_parameters() if p.requires_grad and "gate" in n]
    assert router_grads and all(g is not None for g in router_grads)


def test_full_mixtral_dry_run_counts_study_parameters():
    from phyassist.train.dryrun import project

    proj = project(load_config("paper"))
    assert proj.trainable == 31_465_472
    assert 22.5 < proj.weights_4bit_dq_gib < 23.5 < proj.weights_4bit_gib
    assert proj.fits() and len(proj.per_gpu) == 2 and sum(proj.layers_per_gpu) == 32


def test_single_gpu_projection_counts_the_kept_dequantized_experts():
    """configs/single-gpu.yaml keeps 8 layers' dequantized experts (2.625 GiB each in bf16) on top
    of every layer's saved activations; the projection is within 1 GiB of the H100 bench's peaks
    (50.47 and 70.99 GiB, bench/finetune_mixtral.md) and under an 80 GB GPU."""
    from phyassist.train.dryrun import project, report

    cfg = load_config("single-gpu")
    kept, none = project(cfg), project(load_config("single-gpu", {"model.quant.keep_dequantized_layers": 0}))
    assert cfg.model.quant.keep_dequantized_layers == 8 and kept.checkpointing is False
    assert kept.kept_weights_gib == pytest.approx(8 * 2.625) and none.kept_weights_gib == 0
    assert kept.per_gpu[0] - none.per_gpu[0] == pytest.approx(21.0)
    assert abs(none.per_gpu[0] - 50.47) < 1 and abs(kept.per_gpu[0] - 70.99) < 1 and kept.per_gpu[0] < 79
    assert "kept dequantized experts (8 layers)      21.00\n" in report(cfg, kept)  # one GPU: no "last GPU"
    # under whole-layer checkpointing they live only during a layer's recompute
    full = project(load_config("single-gpu", {"train.gradient_checkpointing": True, "train.compile_attention": False}))
    assert full.kept_weights_gib == 0


def test_dry_run_table_says_totals_per_gpu_and_balances_a_small_model():
    """Issue 24 point 8: a small dense model's layers spread over both GPUs (its logits on the last
    GPU outweigh all its layers), the table says which terms are whole-model and which per GPU, the
    router is named only for MoE models, and a CPU profile says nothing about CUDA or GPUs."""
    from phyassist.train.dryrun import project, report

    small = load_config("paper", {"model.name": "qwen2.5-1.5b-instruct"})
    assert small.train.lora.target_router and small.model.num_gpus == 2
    proj = project(small)
    text = report(small, proj)
    assert proj.layers == 28 and proj.layers_per_gpu == [14, 14]
    assert "router" not in text
    assert "memory projection, whole model (GiB)" in text and "memory projection, per GPU (GiB)" in text
    assert "GPU 0: 14 layers + embeddings" in text and "GPU 1: 14 layers + head, logits" in text
    assert "logits + loss" in text and "on the last GPU" in text
    mixtral = load_config("paper")
    assert "+ MoE router" in report(mixtral, project(mixtral))
    cpu = load_config("smoke", {"model.num_gpus": 2})
    cpu_proj = project(cpu)
    cpu_text = report(cpu, cpu_proj)
    assert "CUDA" not in cpu_text and "GPU" not in cpu_text and cpu_proj.layers_per_gpu == [30]
    assert "CPU: all 30 layers" in cpu_text and "of memory on the CPU" in cpu_text


def test_layer_split_and_device_map():
    from phyassist.models.placement import balance_layers, layer_device_map

    assert balance_layers(32, [1.0, 1.0]) == [16, 16]
    assert balance_layers(31, [1.5, 0.5]) == [15, 16]  # the remainder to the lighter GPU
    assert balance_layers(28, [0.1, 5.0]) == [14, 14]  # a heavy head does not empty the last GPU
    assert balance_layers(3, [1.0, 1.0, 1.0, 1.0]) == [1, 1, 1, 0]
    cfg = architecture_config("tiny-mixtral")
    dmap = layer_device_map(cfg, [1, 1])
    assert dmap["model.embed_tokens"] == 0 and dmap["lm_head"] == 1
    assert dmap["model.layers.0"] == 0 and dmap["model.layers.1"] == 1
    with pytest.raises(ValueError, match="do not add up"):
        layer_device_map(cfg, [1, 2])


def test_dry_run_cli_says_when_a_model_does_not_fit():
    cmd = [sys.executable, "-m", "phyassist", "train", "--config", "paper", "--dry-run",
           "model.name=llama-2-70b-chat", "model.num_gpus=1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr
    assert "DOES NOT FIT" in res.stdout and "Would fit: 2 GPUs of 24 GiB" in res.stdout


def _grads_with(checkpointing, over=None):
    """Loss and LoRA gradients of the tiny 4-bit Mixtral (grouped experts) under one mode."""
    from phyassist.models.loading import load_model
    from phyassist.train.trainer import prepare_for_training

    cfg = load_config("smoke", {"model.name": "tiny-mixtral", "model.quant.experts_method": "grouped",
                                "train.gradient_checkpointing": checkpointing, "train.lora.dropout": 0.0,
                                "train.lora.target_router": True, **(over or {})})
    torch.manual_seed(0)
    model = prepare_for_training(load_model(cfg.model, for_training=True), cfg)
    if checkpointing is True:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for n, p in model.named_parameters():  # LoRA B starts at zero: give it values so A gets gradients
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same dropout masks for every mode
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_attention_only_checkpointing_gives_the_same_gradients(monkeypatch):
    import phyassist.models.mixtral4bit.checkpointing as ck

    calls = []
    real = ck.checkpoint
    monkeypatch.setattr(ck, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss0, g0 = _grads_with(False)
    assert not calls
    for mode in (True, "attention"):
        loss, g = _grads_with(mode)
        assert abs(loss - loss0) < 1e-5
        assert g.keys() == g0.keys() and any("gate" in n for n in g)  # the router's LoRA too
        for n in g0:
            assert torch.allclose(g[n], g0[n], atol=1e-6, rtol=1e-4), n
    assert len(calls) == architecture_config("tiny-mixtral").num_hidden_layers  # one per layer, "attention" only


@pytest.mark.parametrize("mode", [False, True, "attention"])
def test_kept_dequantized_weights_give_the_same_gradients_without_dequantizing_again(monkeypatch, mode):
    """model.quant.keep_dequantized_layers: the backward reuses the forward's dequantized weights
    (the same values, so bit-equal gradients) and dequantizes only where they were not kept."""
    from phyassist.models.mixtral4bit.experts import Packed4bit

    calls = []
    real = Packed4bit.dequantize
    monkeypatch.setattr(Packed4bit, "dequantize", lambda self, *a: calls.append(1) or real(self, *a))
    layers = architecture_config("tiny-mixtral").num_hidden_layers
    loss0, g0 = _grads_with(mode)
    per_layer = len(calls) // layers  # 4 (forward + backward), 6 with whole-layer recompute
    for keep in range(1, layers + 1):
        calls.clear()
        loss, g = _grads_with(mode, {"model.quant.keep_dequantized_layers": keep})
        assert loss == loss0 and g.keys() == g0.keys()
        for n in g0:
            assert torch.equal(g[n], g0[n]), (keep, n)
        assert len(calls) == layers * per_layer - 2 * keep, (keep, len(calls))


def test_keep_dequantized_layers_is_validated_and_reaches_the_last_layers():
    from phyassist.config import ConfigError
    from phyassist.models.loading import load_model
    from phyassist.models.mixtral4bit.experts import keep_dequantized_weights
    from phyassist.train.trainer import prepare_for_training

    with pytest.raises(ConfigError, match="keep_dequantized_layers=2 needs experts_method: grouped"):
        load_config("smoke", {"model.name": "tiny-mixtral", "model.quant.keep_dequantized_layers": 2})
    with pytest.raises(ConfigError, match="keep_dequantized_layers"):
        load_config("smoke", {"model.quant.keep_dequantized_layers": -1})
    cfg = load_config("smoke", {"model.name": "tiny-mixtral", "model.quant.experts_method": "grouped",
                                "model.quant.keep_dequantized_layers": 1})
    model = prepare_for_training(load_model(cfg.model, for_training=True), cfg)
    kept = [m.keep_weights for m in model.modules() if isinstance(m, Quant4bitExperts)]
    assert kept == [False] * (len(kept) - 1) + [True]
    with pytest.raises(ValueError, match=f"has {len(kept)} 4-bit expert blocks"):
        keep_dequantized_weights(model, len(kept) + 1)


def _compiled_grads(over, mode="attention"):
    """``_grads_with(mode)`` compiled afresh (a cached graph may come from another budget);
    also returns how many graphs dynamo compiled (0 would mean nothing was compiled)."""
    import phyassist.models.mixtral4bit.checkpointing as ck
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    ck._compiled.clear()
    counters.clear()
    loss, grads = _grads_with(mode, {"train.compile_attention": True, **over})
    return loss, grads, counters["stats"]["unique_graphs"]


def test_compiled_attention_half_gives_the_same_gradients():
    loss0, g0 = _grads_with(False)
    for mode, over in (("attention", {}), ("attention", {"train.attention_memory_budget": 0.1}),
                       (False, {})):
        loss, g, graphs = _compiled_grads(over, mode)
        assert graphs >= 1, over
        assert abs(loss - loss0) < 1e-5 and g.keys() == g0.keys()
        for n in g0:
            assert torch.allclose(g[n], g0[n], atol=1e-6, rtol=1e-4), (mode, over, n)


def test_no_checkpointing_with_compile_keeps_all_activations():
    """gradient_checkpointing false + compile_attention (configs/single-gpu.yaml): nothing
    recomputed, the attention half compiled, the experts keep their gate/up activations."""
    import phyassist.models.mixtral4bit.checkpointing as ck
    from phyassist.models.loading import load_model
    from phyassist.models.mixtral4bit.experts import Quant4bitExperts
    from phyassist.train.trainer import prepare_for_training

    cfg = load_config("smoke", {"model.name": "tiny-mixtral", "model.quant.experts_method": "grouped",
                                "train.compile_attention": True})
    assert cfg.train.gradient_checkpointing is False
    model = prepare_for_training(load_model(cfg.model, for_training=True), cfg)
    layers = ck.decoder_layers(model)
    assert all(layer.attention_only.compile and not layer.attention_only.checkpoint for layer in layers)
    experts = [[m for m in layer.mlp.modules() if isinstance(m, Quant4bitExperts)] for layer in layers]
    assert all(e and all(m.keep_activations for m in e) for e in experts)


def test_compiled_attention_half_stays_one_graph_after_outputs_were_captured():
    """Once any output is asked of the model (as TRL's trainer does), transformers hooks every
    attention module; the hook's ContextVar lookup must not split the compiled attention half
    (it did: three graphs per layer, bench/trainer_gpu.md)."""
    from torch._dynamo.utils import counters

    from phyassist.config import load_config
    from phyassist.models.loading import load_model
    from phyassist.train.trainer import prepare_for_training
    import phyassist.models.mixtral4bit.checkpointing as ck

    torch._dynamo.reset()
    ck._compiled.clear()
    counters.clear()
    cfg = load_config("smoke", {"model.name": "tiny-mixtral", "model.quant.experts_method": "grouped",
                                "train.gradient_checkpointing": "attention", "train.compile_attention": True})
    model = prepare_for_training(load_model(cfg.model, for_training=True), cfg)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)  # installs the hooks on every module kind
    layers = ck.decoder_layers(model)
    assert len(out.hidden_states) == len(layers) + 1
    assert all(ck.only_output_capturing_hooks(layer.self_attn) and layer.self_attn._forward_hooks
               for layer in layers)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # layer 0 (input without grad) and the others
    layers[0].self_attn.register_forward_pre_hook(lambda *a: None)
    assert not ck.only_output_capturing_hooks(layers[0].self_attn)  # other hooks are never skipped


def test_compiled_checkpointed_attention_replays_its_dropout_masks():
    """Under checkpointing the compiled attention half runs twice; its recompute must draw the
    forward's dropout masks again, or the gradients would differ from keeping the activations."""
    drop = {"train.lora.dropout": 0.05}
    loss_ck, g_ck, _ = _compiled_grads(drop)
    loss_keep, g_keep, _ = _compiled_grads({**drop, "train.attention_memory_budget": 1.0})
    loss_nodrop, _, _ = _compiled_grads({})
    assert loss_ck == loss_keep and loss_ck != loss_nodrop  # dropout really on, same masks
    for n in g_keep:
        assert torch.allclose(g_ck[n], g_keep[n], atol=1e-6, rtol=1e-4), n


def test_evaluation_and_generation_run_the_attention_half_eagerly():
    import phyassist.models.mixtral4bit.checkpointing as ck
    from phyassist.models.loading import load_model

    cfg = load_config("smoke", {"model.name": "tiny-mixtral", "model.quant.experts_method": "grouped"})
    model = load_model(cfg.model, for_training=True)
    ck.checkpoint_attention_only(model, compile=True)
    ck._compiled.clear()
    model.eval()
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert not ck._compiled  # nothing compiled outside training


def test_compile_attention_refuses_whole_layer_checkpointing():
    with pytest.raises(Exception, match="compile_attention needs train.gradient_checkpointing: attention or false"):
        load_config("smoke", {"train.compile_attention": True, "train.gradient_checkpointing": True})
    assert load_config("smoke", {"train.compile_attention": True}).train.compile_attention
    with pytest.raises(Exception, match="attention_memory_budget needs"):
        load_config("smoke", {"train.attention_memory_budget": 0.5})


def test_attention_only_checkpointing_patches_layers_and_experts():
    from phyassist.models.loading import load_model
    from phyassist.models.mixtral4bit.experts import Quant4bitExperts
    from phyassist.models.mixtral4bit.checkpointing import checkpoint_attention_only

    cfg = load_config("smoke", {"model.name": "tiny-mixtral", "model.quant.experts_method": "grouped"})
    model = load_model(cfg.model, for_training=True)
    experts = [m for m in model.modules() if isinstance(m, Quant4bitExperts)]
    assert experts and all(m.keep_activations for m in experts)
    assert checkpoint_attention_only(model) == architecture_config("tiny-mixtral").num_hidden_layers
    assert not any(m.keep_activations for m in experts)  # they recompute gate/up instead
    with pytest.raises(ValueError, match="no pre-norm decoder layers"):
        checkpoint_attention_only(torch.nn.Linear(2, 2))


def test_attention_only_checkpointing_keeps_accelerate_device_hooks():
    """A model split over GPUs by accelerate (the study's two-GPU layer split) moves each layer's
    input to its device in a hook around ``forward``; the patched layers must keep calling it."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    import phyassist.models.mixtral4bit.checkpointing as ck
    from phyassist.models.loading import load_model

    class Recorder(ModelHook):
        def __init__(self):
            self.calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    cfg = load_config("smoke", {"model.name": "tiny-mixtral", "model.quant.experts_method": "grouped"})
    model = load_model(cfg.model, for_training=True)
    layers = ck.decoder_layers(model)
    hooks = [Recorder() for _ in layers]
    for layer, hook in zip(layers, hooks):
        add_hook_to_module(layer, hook)
    ck.checkpoint_attention_only(model)
    model.train()
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert [h.calls for h in hooks] == [1] * len(layers)
    assert all(layer._old_forward.__func__ is ck._layer_forward for layer in layers)


def test_compiled_attention_half_traces_a_layer_split_by_accelerate():
    """dispatch_model (the study's two-GPU split) hooks each layer and every submodule with
    parameters; dynamo cannot trace the inner hooks (this step failed with them), so the compiled
    path removes them and keeps each layer's own hook, which moves the layer's inputs."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, attach_execution_device_hook
    from torch._dynamo.utils import counters

    import phyassist.models.mixtral4bit.checkpointing as ck
    from phyassist.models.loading import load_model
    from phyassist.train.trainer import prepare_for_training

    cfg = load_config("smoke", {"model.name": "tiny-mixtral", "model.quant.experts_method": "grouped",
                                "train.gradient_checkpointing": "attention", "train.compile_attention": True})
    model = load_model(cfg.model, for_training=True)
    layers = ck.decoder_layers(model)
    for layer in layers:  # what dispatch_model attaches for a device map of whole layers
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu"))
        attach_execution_device_hook(layer, "cpu")
    hooked = lambda: [m for m in model.modules() if getattr(m, "_hf_hook", None) is not None]  # noqa: E731
    assert len(hooked()) > len(layers)
    torch._dynamo.reset()
    ck._compiled.clear()
    counters.clear()
    model = prepare_for_training(model, cfg)
    assert hooked() == layers  # only the layers' own hooks are left
    model.train()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2


def test_moe_input_is_rounded_once_to_the_experts_dtype_under_autocast():
    """QLoRA's prep leaves the norms in fp32; under bf16 autocast the MoE input is stored once in
    bf16 (the router and the experts round it to bf16 anyway), without autocast it stays as is."""
    from torch import nn

    from phyassist.models.mixtral4bit.checkpointing import attention_half

    class Attn(nn.Module):
        def forward(self, hidden_states, **kw):
            return hidden_states * 2, None

    layer = nn.Module()
    layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn = nn.Identity(), nn.Identity(), Attn()
    x = torch.randn(2, 3, 8)
    h, normed = attention_half(layer, x, mlp_input_dtype=torch.bfloat16)
    assert normed.dtype == torch.float32 and h.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, normed = attention_half(layer, x, mlp_input_dtype=torch.bfloat16)
    assert normed.dtype == torch.bfloat16 and h.dtype == torch.float32  # the residual stream keeps fp32
    assert torch.equal(normed, (3 * x).to(torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_half(layer, x)[1].dtype == torch.float32


@pytest.mark.gpu
def test_gpu_grouped_and_per_expert_gemms_agree_and_kept_weights_are_bit_equal(has_gpu):
    """On CUDA in bf16 (torch's grouped GEMM runs there only): the grouped and per-expert GEMMs give
    the same outputs and gradients within bf16 rounding, and keeping the dequantized weights for the
    backward gives bit-equal gradients."""
    cfg, ex, x, idx, w = _experts_and_routing(tokens=64)
    ex, x, idx, w = ex.cuda(), x.cuda().bfloat16(), idx.cuda(), w.cuda()
    runs = {}
    for gemm, keep in (("per_expert", False), ("grouped", False), ("grouped", True)):
        q = Quant4bitExperts(ex, compute_dtype=torch.bfloat16, keep_activations=False, gemm=gemm)
        q.keep_weights = keep
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = q(xg, idx, wg)
        out.backward(torch.ones_like(out))
        runs[(gemm, keep)] = (out, xg.grad, wg.grad)
    for a, b in zip(runs[("per_expert", False)], runs[("grouped", False)]):
        assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    for a, b in zip(runs[("grouped", False)], runs[("grouped", True)]):
        assert torch.equal(a, b)
