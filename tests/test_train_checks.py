"""Clear refusals before training (too little GPU memory) and padding-free packing without
attention across the packed examples."""

import types

import pytest
import torch

from phyassist.config import load_config


def test_too_little_gpu_memory_says_how_much_is_needed(monkeypatch):
    from phyassist.train.checks import TrainSetupError, check_hardware

    from phyassist.train.dryrun import project

    cfg = load_config("paper")  # Mixtral-8x7B on two 24 GB GPUs
    project(cfg)  # imports (bitsandbytes among them) happen before CUDA is faked below
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(total_memory=12 * 2**30, name="small GPU"))
    with pytest.raises(TrainSetupError, match=r"needs about \d+\.\d GiB per GPU on 2 GPU\(s\).*has 12\.0 GiB.*"
                                              r"would fit on \d+ such GPU"):
        check_hardware(cfg)
    # the same profile on two 24 GiB cards passes
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(total_memory=24 * 2**30, name="RTX 3090"))
    check_hardware(cfg)
    # single-gpu on a 64 GiB card: about 71 GiB, 21 of them kept dequantized experts; says so
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(total_memory=64 * 2**30, name="64 GiB GPU"))
    with pytest.raises(TrainSetupError, match=r"needs about 70\.\d GiB per GPU on 1 GPU.*keep_dequantized_layers=8 "
                                              r"holds 21\.0 GiB"):
        check_hardware(load_config("single-gpu"))
    check_hardware(load_config("single-gpu", {"model.quant.keep_dequantized_layers": 0}))


def test_packed_examples_do_not_attend_to_each_other():
    """What padding-free packing relies on: position ids restarting at 0 start a new example
    (transformers builds a block-diagonal causal mask from them for sdpa)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    a, b = torch.randint(0, 100, (1, 7)), torch.randint(0, 100, (1, 5))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=packed, position_ids=pos, use_cache=False).logits  # as in training
        alone_b = model(input_ids=b).logits
        alone_a = model(input_ids=a).logits
        leaky = model(input_ids=packed).logits  # plain concatenation: b sees a
    assert torch.allclose(out[:, :7], alone_a, atol=1e-5)
    assert torch.allclose(out[:, 7:], alone_b, atol=1e-5)
    assert not torch.allclose(leaky[:, 7:], alone_b, atol=1e-3)
