"""Config section ``app``: the counselor assistant (Gradio), its encrypted store and its limits."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from phyassist.schema_base import Section


class AppConfig(Section):
    host: str = Field("127.0.0.1", description="Bind address; loopback unless you mean to serve a clinic LAN.")
    port: int = Field(7860, ge=0, le=65535, description="0 picks a free port.")
    data_dir: str = Field("~/.local/share/phyassist/app", description="Database file and encrypted adapters.")
    database_url: Optional[str] = Field(
        None, description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db; null: SQLite in data_dir. "
                          "Env PHYASSIST_APP_DB_URL wins.")
    key_env: str = Field("PHYASSIST_APP_KEY", description="Env var holding the base64 AES-256 key.")
    key_file: str = Field("~/.config/phyassist/app.key",
                          description="Key file (0600) created on first run; must lie outside data_dir.")
    users_env: str = Field("PHYASSIST_APP_USERS", description="Env var with logins 'alice:pw,bob:pw2'.")
    auth_file: Optional[str] = Field(None, description="File of 'user:password' lines for the login page.")
    adapter: Optional[str] = Field(None, description="Kit-fine-tuned adapter used for patients without their own.")
    max_new_tokens: int = Field(192, gt=0, description="Tokens drafted per analysis / chat reply.")
    item_max_new_tokens: int = Field(64, gt=0, description="Tokens for regenerating one draft item.")
    repetition_penalty: float = Field(1.15, ge=1.0)
    guided_format: bool = Field(True, description="Keep analyses in the note format (symptom type, numbered "
                                                  "reasons, numbered advice) by writing each line's start for "
                                                  "the model; off: the model writes freely and the parser copes.")
    context_tokens: int = Field(2048, gt=128, description="Prompt + answer tokens used (capped by the model's).")
    context_notes: int = Field(5, ge=0, description="Most recent notes offered as context (budget permitting).")
    max_input_chars: int = Field(4000, gt=0, description="Longest accepted text from the counselor.")
    max_import_notes: int = Field(500, gt=0, description="Most notes one imported patient file may hold.")
    max_note_items: int = Field(50, gt=0, description="Most reasons (and most advice items) in one note or draft, "
                                                      "typed or imported.")
    max_import_mb: float = Field(8.0, gt=0, description="Largest accepted upload (the import file), in MB.")
    login_max_failures: int = Field(5, gt=0, description="Wrong passwords in a row, per user and address (and "
                                                        "4x this per address), before logins from there wait.")
    login_lockout_s: float = Field(30.0, gt=0, description="First wait after too many wrong passwords; it doubles "
                                                           "with every further failure, up to 15 minutes.")
    max_adapters: int = Field(20, ge=0, description="Most patient adapters kept on disk.")
    max_loaded_adapters: int = Field(4, gt=0, description="Patient adapters kept in memory (LRU).")
    max_note_chars: int = Field(2000, gt=0, description="Notes longer than this are cut for adapter training.")
    min_train_notes: int = Field(1, ge=1, description="Saved notes a patient needs before training.")
    train_max_steps: int = Field(20, gt=0, description="Optimizer steps of a per-patient adapter.")
    train_batch_size: int = Field(2, gt=0, description="Notes per optimizer step. On a GPU each step pays a fixed "
                                                       "cost (4-bit dequantization, kernel launches), so fewer, "
                                                       "larger steps over the same notes finish sooner.")
    train_4bit_on_cpu: bool = Field(False, description="Patient training on a CPU in full precision (much faster "
                                                        "than bitsandbytes 4-bit there): the job's copy of the "
                                                        "loaded model gets dequantized linears of its own; GPUs "
                                                        "train on the shared 4-bit weights.")
    train_lora_r: int = Field(8, gt=0)
    warmup: bool = Field(True, description="At start-up, after the model loads, run short analyses of made-up "
                                           "words (no patient, nothing stored; on a GPU five prompt lengths, "
                                           "about 12 s for Mixtral on an H100) so the first counselor's first "
                                           "token does not pay for GPU start-up.")
    concurrency_limit: int = Field(1, gt=0, description="Generations run at once (one model in memory).")
    queue_size: int = Field(64, gt=0, description="Requests waiting in the queue before new ones are refused.")
