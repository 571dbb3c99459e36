"""Layer-by-layer 4-bit loader (phyassist.models.mixtral4bit.loader) on the CPU with tiny random Mixtrals
saved in both checkpoint layouts: per expert (original, sharded with an index) and fused."""

import json

import pytest
import torch
from safetensors.torch import save_file

from phyassist.config import load_config
from phyassist.models.mixtral4bit.experts import iter_fused_experts, sixteen_bit_weights
from phyassist.models.mixtral4bit.loader import CheckpointError, load_quantized_moe
from phyassist.models.registry import get_spec, tiny_config

IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def _float_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    return AutoModelForCausalLM.from_config(tiny_config(get_spec("tiny-mixtral")), dtype=torch.float32).eval()


def _per_expert_state(model) -> dict[str, torch.Tensor]:
    """The original Mixtral names: ``block_sparse_moe``, one w1/w2/w3 matrix per expert."""
    out = {}
    for name, t in model.state_dict().items():
        name = name.replace(".mlp.", ".block_sparse_moe.")
        stem, _, leaf = name.rpartition(".")
        if leaf == "gate_up_proj":
            w1, w3 = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{stem}.{e}.w1.weight"], out[f"{stem}.{e}.w3.weight"] = w1[e].clone(), w3[e].clone()
        elif leaf == "down_proj":
            for e in range(t.shape[0]):
                out[f"{stem}.{e}.w2.weight"] = t[e].clone()
        else:
            out[name] = t.clone()
    return out


def save_per_expert_sharded(model, folder, shards: int = 3):
    """Write the original per-expert layout over ``shards`` files with an index json."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = _per_expert_state(model)
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[s::shards]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = _float_model()
    fused = root / "fused"
    model.save_pretrained(fused, save_original_format=False)
    per_expert = save_per_expert_sharded(model, root / "per_expert")
    return model, {"fused": fused, "per_expert": per_expert}


def _mcfg(path):
    return load_config("smoke", {"model.name": str(path)}).model  # CPU, 4-bit NF4, fp32 compute


def _existing_path_model(path):
    """The previous route: bitsandbytes' 4-bit load, then quantize_moe_experts."""
    from transformers import AutoModelForCausalLM

    from phyassist.models.loading import bnb_config
    from phyassist.models.mixtral4bit.experts import quantize_moe_experts

    mcfg = _mcfg(path)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(mcfg),
                                                 dtype=torch.float32, device_map={"": "cpu"})
    quantize_moe_experts(model, mcfg.quant)
    return model.eval()


def test_layouts_hold_the_same_weights_as_transformers_reads_them(checkpoints):
    """Our per-expert writer agrees with transformers' own conversion mapping (its loader)."""
    from transformers import AutoModelForCausalLM

    model, paths = checkpoints
    keys = json.loads((paths["per_expert"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in keys
    back = AutoModelForCausalLM.from_pretrained(paths["per_expert"], dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_loader_builds_4bit_model_matching_existing_path_and_float(checkpoints, layout):
    model, paths = checkpoints
    q = load_quantized_moe(_mcfg(paths[layout]), str(paths[layout]), progress=False)
    assert list(iter_fused_experts(q)) == [] and sixteen_bit_weights(q) == []
    packed = [n for n, p in q.named_parameters() if "experts" in n or "_proj" in n]
    assert packed and all(q.get_parameter(n).dtype == torch.uint8 for n in packed)
    assert not any(p.is_meta for p in list(q.parameters()) + list(q.buffers()))
    with torch.no_grad():
        got = q(IDS).logits
        ref = _existing_path_model(paths["fused"])(IDS).logits
        flt = model(IDS).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()
    # NF4 moves each weight by ~10 % of its scale: the logits follow closely, not exactly
    # (measured 0.12 relative error, cosine 0.992 for this seed)
    rel = ((got - flt).norm() / flt.norm()).item()
    assert 0.01 < rel < 0.2, rel
    assert torch.nn.functional.cosine_similarity(got.flatten(), flt.flatten(), dim=0) > 0.98


def test_load_model_routes_moe_through_the_layer_loader(checkpoints):
    from phyassist.models.loading import load_model

    _, paths = checkpoints
    model = load_model(_mcfg(paths["per_expert"]), for_training=True)
    assert model.is_loaded_in_4bit and model.config.use_cache is False
    assert model.hf_quantizer.quantization_config.load_in_4bit  # the Trainer checks this
    assert sixteen_bit_weights(model) == []


def test_missing_tensor_names_key_and_file(checkpoints, tmp_path):
    model, _ = checkpoints
    folder = save_per_expert_sharded(model, tmp_path / "broken")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    shard = folder / index[key]
    from safetensors.torch import load_file

    kept = {k: v for k, v in load_file(str(shard)).items() if k != key}
    save_file(kept, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key}.*{shard.name}"):
        load_quantized_moe(_mcfg(folder), str(folder), progress=False)


def test_tensor_absent_from_index_is_named(checkpoints, tmp_path):
    model, _ = checkpoints
    folder = save_per_expert_sharded(model, tmp_path / "noindex")
    path = folder / "model.safetensors.index.json"
    data = json.loads(path.read_text())
    del data["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*index\.json"):
        load_quantized_moe(_mcfg(folder), str(folder), progress=False)


def test_plan_splits_full_mixtral_over_two_24gb_gpus(monkeypatch):
    """The placement for the study (no GPU needed: meta model, explicit per-GPU cap)."""
    from phyassist.models.mixtral4bit import loader
    from phyassist.models.mixtral4bit.loader import plan_device_map
    from phyassist.train.dryrun import meta_model

    model, _ = meta_model("mixtral-8x7b-instruct")
    monkeypatch.setattr(loader, "device_map", lambda mcfg: "balanced")
    mcfg = load_config("paper").model.model_copy(update={"num_gpus": 2, "max_memory_per_gpu": "24GiB"})
    dmap = plan_device_map(mcfg, model, mcfg.quant)
    layers = [dmap[f"model.layers.{i}"] for i in range(32)]
    assert layers == sorted(layers) and layers.count(0) == layers.count(1) == 16
    assert dmap["model.embed_tokens"] == 0 and dmap["lm_head"] == 1
    one = mcfg.model_copy(update={"num_gpus": 1})
    with pytest.raises(CheckpointError, match="GPU 0: 32 layers"):
        plan_device_map(one, model, one.quant)
