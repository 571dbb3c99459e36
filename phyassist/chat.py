"""``python -m phyassist chat --config <profile> [--adapters a,b] [--once "question"]``

A streaming command-line chat with the configured model and any stack of LoRA adapters (the
main study's adapter, recipe A's, or recipe B's SFT + RL). Tokens are printed as they are
generated; the conversation is kept as history. ``/reset`` clears it, ``/exit`` (or EOF) quits.
"""

from __future__ import annotations

import argparse
import sys
from threading import Thread
from typing import Iterator, TextIO

COMMANDS = {"/exit": "quit", "/quit": "quit", "/reset": "clear the conversation", "/help": "this list"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapters", default="", help="comma-separated adapter folders, stacked in order "
                        "(e.g. runs/covid/sft/adapter,runs/covid/rl/adapter)")
    parser.add_argument("--system", default=None, help="system prompt (default: data.system_prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: evaluate.max_new_tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--once", default=None, help="answer this one message and exit (scripts, tests)")


def parse_adapters(text: str) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def stream_reply(model, tok, messages: list[dict], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 0.9) -> Iterator[str]:
    """Yield the reply's text pieces as the model generates them (generation runs in a thread)."""
    from transformers import TextIteratorStreamer

    from phyassist.evaluate.generate import generation_kwargs
    from phyassist.models.generation import generate

    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kw = generation_kwargs(tok, max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                           top_p=top_p)
    errors: list[BaseException] = []

    def work():
        try:
            generate(model, **enc, **kw, streamer=streamer)
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)
            streamer.end()

    thread = Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


def reply(model, tok, history: list[dict], user_text: str, out: TextIO, **gen) -> str:
    """Stream one answer to ``out`` and append both turns to ``history``."""
    history.append({"role": "user", "content": user_text})
    pieces = []
    for piece in stream_reply(model, tok, history, **gen):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    text = "".join(pieces).strip()
    history.append({"role": "assistant", "content": text})
    return text


def fresh_history(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def loop(model, tok, system: str | None, inp: TextIO, out: TextIO, **gen) -> int:
    """Read messages line by line until /exit or end of input."""
    history = fresh_history(system)
    out.write("Type a message; /reset clears the conversation, /exit quits.\n")
    while True:
        out.write("you> ")
        out.flush()
        line = inp.readline()
        if not line:
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = fresh_history(system)
            out.write("(conversation cleared)\n")
            continue
        if text == "/help":
            out.write("".join(f"  {k}: {v}\n" for k, v in COMMANDS.items()))
            continue
        out.write("assistant> ")
        reply(model, tok, history, text, out, **gen)


def main(cfg, args: argparse.Namespace) -> int:
    from phyassist.models.inference import load_for_inference

    adapters = parse_adapters(args.adapters)
    print(f"[chat] loading {cfg.model.name}" + (f" + {', '.join(adapters)}" if adapters else ""), file=sys.stderr)
    model, tok = load_for_inference(cfg, adapters)
    system = args.system if args.system is not None else cfg.data.system_prompt
    gen = dict(max_new_tokens=args.max_new_tokens or cfg.evaluate.max_new_tokens, temperature=args.temperature,
               top_p=args.top_p)
    if args.once is not None:
        reply(model, tok, fresh_history(system), args.once, sys.stdout, **gen)
        return 0
    return loop(model, tok, system, sys.stdin, sys.stdout, **gen)
