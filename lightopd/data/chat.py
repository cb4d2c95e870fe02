"""How a prompt record becomes the token ids fed to the model; rollout and eval render alike.

- `messages` are rendered with the tokenizer's chat template and its generation prompt.
- A plain prompt is fed as it is (after the tokenizer's BOS, if it adds one), unless chat is on:
  `--chat always`, or `--chat auto` with a chat model's tokenizer, one whose chat template ends a
  turn with a token the model stops at (Qwen3's `<|im_end|>`, Llama-3-Instruct's `<|eot_id|>`;
  their base checkpoints ship the template but stop elsewhere). Then it becomes one user turn.
  `--chat never` feeds plain prompts as they are, always.
- `--system-prompt` becomes the first turn of every chat that has no system turn of its own.
- `--chat-template-kwargs` (a JSON object) goes to the template, e.g. `{"enable_thinking": false}`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from lightopd.data.fields import PromptRecord
from lightopd.errors import InputError

CHAT_MODES = ("auto", "always", "never")
PROBE = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]


@dataclass(frozen=True)
class ChatSettings:
    mode: str = "auto"  # one of CHAT_MODES
    system_prompt: str | None = None
    template_kwargs: dict = field(default_factory=dict)


def _ids(encoded) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def speaks_chat(tokenizer, eos_ids: list[int]) -> bool:
    """Whether the tokenizer is a chat model's: its template closes a turn with one of the model's
    end tokens, so the model was trained to answer a turn and stop."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        text = tokenizer.apply_chat_template(PROBE, tokenize=False)
    except Exception:  # a template that cannot render a plain exchange is not used for plain prompts
        return False
    ends = [t for t in tokenizer.convert_ids_to_tokens(eos_ids) if t]
    after = text[text.find("pong"):]
    return any(t in after for t in ends)


class Renderer:
    """Token ids of prompt records under one set of chat settings."""

    def __init__(self, tokenizer, settings: ChatSettings, eos_ids: list[int], what: str = "--model"):
        self.tokenizer, self.settings = tokenizer, settings
        template = getattr(tokenizer, "chat_template", None)
        if settings.mode == "always" and not template:
            raise InputError(f"--chat always: the tokenizer of {what} has no chat template")
        self.wraps_plain = settings.mode == "always" or (settings.mode == "auto" and speaks_chat(tokenizer, eos_ids))
        self.template_sha = None if not template else "sha256:" + hashlib.sha256(
            str(template).encode()).hexdigest()[:32]
        self.chats = 0  # records rendered with the template so far

    def describe(self) -> dict:
        """What the store's manifest records of the rendering."""
        s = self.settings
        return {"chat": s.mode, "plain_prompts": "user turn" if self.wraps_plain else "as they are",
                "system_prompt": s.system_prompt, "chat_template_kwargs": s.template_kwargs,
                "chat_template": self.template_sha}

    def ids(self, record: PromptRecord) -> list[int]:
        if record.prompt is not None and not self.wraps_plain:
            return list(self.tokenizer(record.prompt, add_special_tokens=True)["input_ids"])
        turns = list(record.messages) if record.prompt is None else [{"role": "user", "content": record.prompt}]
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(f"{record.where}: messages need a chat template, and this tokenizer has none (use plain "
                             "prompts, or a tokenizer with a chat_template)")
        if self.settings.system_prompt is not None and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.settings.system_prompt})
        self.chats += 1
        try:
            return _ids(self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                           **self.settings.template_kwargs))
        except Exception as e:  # jinja raises its own errors (a role the template refuses, a bad kwarg)
            raise InputError(f"{record.where}: the chat template cannot render it ({type(e).__name__}: {e})") from None

    def check_used(self) -> None:
        """Chat options that no record used are an error: they would silently change nothing."""
        s = self.settings
        if self.chats == 0 and (s.system_prompt is not None or s.template_kwargs):
            flag = "--system-prompt" if s.system_prompt is not None else "--chat-template-kwargs"
            raise InputError(f"{flag}: no prompt is rendered with the chat template (these are plain prompts, fed "
                             "as they are with this tokenizer); pass --chat always to wrap each as a user turn")
