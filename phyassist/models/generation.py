"""One generation path for every model the kit loads: HF ``generate``'s interface, a static KV cache
and CUDA-graph decode steps where they pay.

Why: with transformers' ``generate`` a decode step of the 4-bit Mixtral is hundreds of small kernels
launched from Python, one token per sequence per step; on an H200 the launches, not the GPU, set the
pace (bench/generation_mixtral.md). Here the prompt is prefilled eagerly into a
:class:`~transformers.StaticCache` (in chunks, so a long batch never materializes all its activations),
then every decode step replays one captured CUDA graph: the model forward with the cache, the position
and the attention mask in fixed buffers, captured with fused RMSNorm, rotary, LoRA, router and 4-bit projection
kernels (:mod:`phyassist.models.fused_decode`: a few kernels a layer instead of dozens). Logits processing
(repetition penalty, the app's format guard, sampling) and stopping stay eager and use transformers' own
processors, so the maths is the same as ``generate``'s.

:func:`generate` is what evaluation, the app, chat and the recipes call. It takes ``model.generate``'s
arguments, and falls back to ``model.generate`` for what the static path does not do (beam search,
models without a static cache, CPUs unless asked: there a Python step is cheap and the dynamic cache
attends over fewer keys). Captured graphs are kept per batch size, cache length and adapter state:
switching a per-patient adapter, loading or unloading one selects or captures another graph, never
replays a stale one.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from phyassist.models.fused_decode import fused_decode, fused_parts

_CHUNK_TOKENS = 8192  # prefill tokens per forward (batch x chunk length): bounds the activations
_LEN_BUCKET = 256  # cache lengths are rounded up to this, so similar prompts share one graph
_KEEP_DECODERS = 8  # captured graphs (with their KV caches) kept per model, least recently used dropped
_KEEP_TOKENS = 1 << 17  # and at most this many cache slots (batch x length) kept in all


def _adapter_state(model) -> tuple:
    """What a captured graph depends on beyond its buffers: the active adapters, whether they are
    disabled or merged, where every parameter lives (a reloaded adapter has new storage) and the
    experts' ``decode_*`` settings (each picks other kernels)."""
    state = []
    for m in model.modules():
        if hasattr(m, "active_adapters") and hasattr(m, "disable_adapters") and hasattr(m, "merged"):
            state.append((tuple(m.active_adapters), bool(m.disable_adapters), bool(m.merged)))
        state.extend((k, v) for k, v in vars(m).items() if k.startswith("decode_"))
    return tuple(state), sum(p.data_ptr() for p in model.parameters()), model.training


def supports_static_cache(model) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(model, "_can_compile_fullgraph", False)) and getattr(cfg, "is_encoder_decoder", False) is False


class StaticDecoder:
    """A static KV cache for ``batch`` sequences of up to ``max_len`` tokens, and (on CUDA) the
    captured decode step that reads and extends it, with the fused kernels of ``fused``
    (:func:`~phyassist.models.fused_decode.fused_parts`' setting: True all)."""

    def __init__(self, model, batch: int, max_len: int, use_graph: bool, fused=True):
        from transformers import StaticCache

        self.model, self.batch, self.max_len = model, batch, max_len
        device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.keys = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # attendable keys
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.use_graph, self.fused = use_graph, fused
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _set_length(self, n: int) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(n)

    def _forward(self, ids, mask4d, positions) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask4d, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Fill the cache with the (left-padded) prompts; returns the last position's logits."""
        b, p = input_ids.shape
        self._set_length(0)
        self.keys.zero_()
        self.keys[:, :p] = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        chunk = max(1, _CHUNK_TOKENS // b)
        idx = torch.arange(self.max_len, device=input_ids.device)
        for s in range(0, p, chunk):
            q = torch.arange(s, min(p, s + chunk), device=input_ids.device)
            # causal over the cache, padding keys hidden; every query sees itself, so a padding
            # query's softmax is never empty (its output is never read)
            mask = (idx[None, None, :] <= q[None, :, None]) & self.keys[:, None, :]
            mask |= idx[None, None, :] == q[None, :, None]
            logits = self._forward(input_ids[:, s:s + chunk], mask[:, None], positions[:, s:s + chunk])
        self.position.copy_(positions[:, -1:] + 1)
        return logits

    def step(self, token: torch.Tensor, at: int) -> torch.Tensor:
        """Logits after feeding ``token`` ([batch]) at cache index ``at`` (= tokens already cached)."""
        self.token.copy_(token.view(-1, 1))
        self.keys[:, at] = True
        if not self.use_graph:
            out = self._forward(self.token, self.keys[:, None, None, :], self.position)
        else:
            if self.graph is None:
                self._capture(at)
            self.graph.replay()
            out = self.logits
        self.position += 1
        return out

    def _capture(self, at: int) -> None:
        """Warm up on a side stream (Triton's autotuning, cuBLAS handles), then capture one step.
        The warm-up writes the cache at ``at``, which the replayed step writes again."""
        mask = self.keys[:, None, None, :]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with fused_decode(self.model, self.fused):  # no parts: patches nothing
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._set_length(at)
                    self._forward(self.token, mask, self.position)
            torch.cuda.current_stream().wait_stream(side)
            self._set_length(at)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._forward(self.token, mask, self.position)
        self._set_length(at)
        self.graph = graph


def _recorded_event(device: torch.device) -> torch.cuda.Event:
    """A timing event on ``device``'s current stream (the model's, not necessarily the current device's)."""
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def _decoder(model, batch: int, need: int, use_graph: bool) -> StaticDecoder:
    """A decoder for this batch size and length from the model's small cache, or a new one."""
    cache: OrderedDict = model.__dict__.setdefault("_phyassist_decoders", OrderedDict())
    length = -(-need // _LEN_BUCKET) * _LEN_BUCKET
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:
        length = max(need, min(length, limit))
    # which fused kernels the graph holds: all unless the benchmark sets fewer to compare (fused_parts)
    fused = fused_parts(getattr(model, "phyassist_fused_decode", True))
    key = (batch, length, use_graph, fused, _adapter_state(model))
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    while cache and (len(cache) >= _KEEP_DECODERS
                     or sum(k[0] * k[1] for k in cache) + batch * length > _KEEP_TOKENS):
        cache.popitem(last=False)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    cache[key] = dec = StaticDecoder(model, batch, length, use_graph, fused)
    return dec


def _processors(do_sample, temperature, top_k, top_p, repetition_penalty, extra):
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if repetition_penalty not in (None, 1.0):
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    procs.extend(extra or [])
    if do_sample:
        if temperature not in (None, 1.0):
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(TopKLogitsWarper(top_k))
        if top_p not in (None, 1.0):
            procs.append(TopPLogitsWarper(top_p))
    return procs


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 256, min_new_tokens: int = 0, do_sample: bool = False,
             temperature: float | None = 1.0, top_p: float | None = 1.0, top_k: int | None = None,
             repetition_penalty: float | None = 1.0, num_beams: int = 1, logits_processor=None,
             stopping_criteria=None, streamer=None, pad_token_id: int | None = None,
             eos_token_id: int | list[int] | None = None, static: bool | None = None,
             sync_every: int = 8, step_events: list | None = None, **kwargs) -> torch.Tensor:
    """``model.generate``'s result (prompt + new tokens, finished rows padded) by the static path.

    ``static``: None chooses (CUDA and a model with a static cache), True/False forces. Graphs are
    captured on CUDA only. ``sync_every``: steps between checks whether every row has finished
    (each check waits for the GPU). ``step_events`` (benchmarks, CUDA): a timing event is recorded into this list
    after the prefill and after each decode step, without waiting for the GPU, so that the steps' time is read
    from the same call (``events[0].elapsed_time(events[-1])``) rather than from a second, prefill-only call (the
    GPU's clock still shows the host's gaps at the every-``sync_every`` checks).
    """
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    gen_cfg = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(gen_cfg, "eos_token_id", None)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    use_static = static if static is not None else (device.type == "cuda" and supports_static_cache(model))
    if not use_static or num_beams != 1 or kwargs:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              min_new_tokens=min_new_tokens or None, do_sample=do_sample, temperature=temperature,
                              top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, num_beams=num_beams,
                              logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                              streamer=streamer, pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    b, p = input_ids.shape
    procs = _processors(do_sample, temperature, top_k, top_p, repetition_penalty, logits_processor)
    if stopping_criteria is not None:
        from transformers import StoppingCriteriaList

        stopping_criteria = StoppingCriteriaList(stopping_criteria)
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    ids = torch.full((b, p + max_new_tokens), pad, dtype=torch.long, device=device)
    ids[:, :p] = input_ids
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    ends = torch.full((b,), max_new_tokens, dtype=torch.long, device=device)  # new tokens per row
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            dec = _decoder(model, b, p + max_new_tokens, use_graph=device.type == "cuda")
            if streamer is not None:
                streamer.put(input_ids.cpu())
            logits = dec.prefill(input_ids, attention_mask)
            timing = step_events is not None and device.type == "cuda"
            if timing:
                step_events.append(_recorded_event(device))
            n = 0
            while n < max_new_tokens:
                scores = logits.float()
                if n < min_new_tokens and eos:
                    scores[:, eos_t] = -float("inf")
                scores = procs(ids[:, :p + n], scores)
                if do_sample:
                    nxt = torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)
                else:
                    nxt = scores.argmax(-1)
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                ids[:, p + n] = nxt
                n += 1
                if streamer is not None:
                    streamer.put(nxt.cpu())
                done = torch.isin(nxt, eos_t) if eos else torch.zeros_like(finished)
                if stopping_criteria is not None:
                    done |= stopping_criteria(ids[:, :p + n], scores).to(device)
                ends = torch.where(done & ~finished, n, ends)
                finished |= done
                if n == max_new_tokens or ((streamer is not None or n % sync_every == 0) and bool(finished.all())):
                    break
                logits = dec.step(nxt, p + n - 1)
                if timing:
                    step_events.append(_recorded_event(device))
    finally:
        if streamer is not None:
            streamer.end()
        model.train(was_training)
    # as generate: up to the step where the last row finished (later pad columns dropped)
    return ids[:, :p + min(n, int(torch.where(finished, ends, n).max()))]
