"""The streaming chat CLI on a tiny random model: streams, keeps history, stacks adapters."""

import io

import pytest

from phyassist import chat
from phyassist.cli import main as cli_main
from phyassist.config import load_config

OVER = ["model.name=tiny-mixtral", "model.device_map=cpu", "model.dtype=float32", "model.quant.load_in_4bit=false"]


@pytest.fixture(scope="module")
def tiny():
    from phyassist.models.inference import load_for_inference

    cfg = load_config("smoke", OVER)
    return load_for_inference(cfg, [])


def test_stream_yields_pieces_that_make_the_reply(tiny):
    model, tok = tiny
    msgs = [{"role": "user", "content": "hello"}]
    pieces = list(chat.stream_reply(model, tok, msgs, max_new_tokens=6))
    assert pieces and "".join(pieces).strip()


def test_loop_keeps_history_and_handles_commands(tiny, monkeypatch):
    model, tok = tiny
    seen = []
    real = chat.stream_reply

    def spy(m, t, messages, **kw):
        seen.append([x["role"] for x in messages])
        return real(m, t, messages, **kw)

    monkeypatch.setattr(chat, "stream_reply", spy)
    out = io.StringIO()
    rc = chat.loop(model, tok, "sys", io.StringIO("hi\nagain\n/reset\nnew\n/exit\n"), out, max_new_tokens=3)
    assert rc == 0 and "(conversation cleared)" in out.getvalue()
    assert seen == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]


def test_cli_once_with_stacked_adapters(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from phyassist.models.loading import load_model

    cfg = load_config("smoke", OVER)
    for i, name in enumerate(["sft", "rl"]):
        peft_model = get_peft_model(load_model(cfg.model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                       init_lora_weights=False))
        peft_model.save_pretrained(str(tmp_path / name / "adapter"))
    adapters = f"{tmp_path}/sft/adapter,{tmp_path}/rl/adapter"
    rc = cli_main(["chat", "--config", "smoke", *OVER, "--adapters", adapters, "--once", "hi",
                   "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.strip() and "sft/adapter, " in captured.err


def test_cli_missing_adapter_is_an_error(tmp_path, capsys):
    rc = cli_main(["chat", "--config", "smoke", *OVER, "--adapters", str(tmp_path), "--once", "hi"])
    assert rc == 1 and "not a PEFT adapter folder" in capsys.readouterr().err
