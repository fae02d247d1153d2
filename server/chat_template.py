"""A checkpoint's chat template: read from `chat_template.jinja` or the `chat_template` field of
`tokenizer_config.json` (as Hugging Face checkpoints ship it) and rendered the way transformers
renders it: jinja2 in an immutable sandbox (a template is data from the checkpoint and must not
reach Python objects), trim_blocks and lstrip_blocks, loop controls, `tojson`, `raise_exception`,
`strftime_now`, and the tokenizer's special tokens (bos_token, eos_token, ...) as variables."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """The template cannot render these messages (it raised, or used something undefined)."""


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)  # a syntax error surfaces here, at load time
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise ChatTemplateError(f"the chat template cannot render these messages: {e}") from None


def load_chat_template(checkpoint_dir: str | Path, special_tokens: dict[str, str]) -> ChatTemplate | None:
    """The checkpoint's template, or None when it has none. `special_tokens` are the defaults for
    the variables tokenizer_config.json does not set. A broken template file raises ValueError
    naming the file, so a server never starts with a template it cannot use."""
    directory = Path(checkpoint_dir)
    config = {}
    if (path := directory / TOKENIZER_CONFIG_FILE).is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot be read ({e})") from None
    source, origin = config.get("chat_template"), path
    if isinstance(source, list):  # named templates: the default one serves chat
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if (jinja := directory / TEMPLATE_FILE).is_file():
        source, origin = jinja.read_text(encoding="utf-8"), jinja
    if not source:
        return None
    if not isinstance(source, str):
        raise ValueError(f"{origin}: chat_template must be a string, got {type(source).__name__}")
    tokens = dict(special_tokens)
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):  # an AddedToken written out
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    try:
        return ChatTemplate(source, tokens)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{origin}: chat template has a syntax error at line {e.lineno}: {e.message}") from None


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message: str):
    raise jinja2.TemplateError(message)
