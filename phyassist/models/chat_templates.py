"""Chat formats the kit knows offline. The tokenizer's own template wins when it has one
(``chat_template: auto``); these are used when it has none or when a config names one.

Mixtral-Instruct's format, as the study quotes it: ``<s>[INST] question [/INST] answer</s>``.
It has no system role, so a system prompt is prepended to the first user turn.
"""

from __future__ import annotations

MIXTRAL = (
    "{{ bos_token }}"
    "{% set sys = namespace(text='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set sys.text = m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + sys.text + m['content'] + ' [/INST]' }}{% set sys.text = '' %}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% endfor %}"
)

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

TEMPLATES = {"mixtral": MIXTRAL, "chatml": CHATML, "llama3": LLAMA3}


def ensure_chat_template(tokenizer, preference: str = "auto", fallback: str | None = None):
    """Give ``tokenizer`` a chat template: its own (``auto``/``tokenizer``) or a named one.

    ``fallback`` is the registry's template for the model, used when ``auto`` finds none.
    """
    if preference in TEMPLATES:
        tokenizer.chat_template = TEMPLATES[preference]
    elif not getattr(tokenizer, "chat_template", None):
        if preference == "tokenizer":
            raise ValueError("model.chat_template=tokenizer but the tokenizer has no chat template")
        if fallback is None:
            raise ValueError("the tokenizer has no chat template; set model.chat_template "
                             f"to one of {sorted(TEMPLATES)}")
        tokenizer.chat_template = TEMPLATES[fallback]
    return tokenizer


def build_messages(question: str, answer: str | None = None, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": question})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def format_prompt_completion(tokenizer, question: str, answer: str, system: str | None = None) -> dict:
    """Split a formatted example into the prompt (no loss) and the completion (loss).

    ``text == prompt + completion`` holds by construction, so the study's single ``text``
    column and TRL's prompt/completion records describe the same tokens.
    """
    prompt = tokenizer.apply_chat_template(build_messages(question, None, system),
                                           tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(build_messages(question, answer, system), tokenize=False)
    if not full.startswith(prompt):
        # Templates without a generation prompt (Mixtral) render the prompt as a prefix anyway.
        raise ValueError("chat template does not render the prompt as a prefix of the full text")
    return {"prompt": prompt, "completion": full[len(prompt):], "text": full}
