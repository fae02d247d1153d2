"""Incremental detokenization with stop strings.

Text is released only when it is final: never a partial UTF-8 character, and never the tail that
could still grow into a stop string.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from models.tokenizer import bytes_to_unicode


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.released = 0  # characters of the text already handed out

    def update(self, output_ids: list[int], check_stop: bool = True) -> tuple[str, bool]:
        """Full text of `output_ids` (cut before the first stop string, when `check_stop`) and
        whether one was hit."""
        if self.tokenizer is None:  # token ids only: there is no text
            return "", False
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        if not check_stop:
            return text, False
        hits = [at for s in self.stop if (at := text.find(s, max(0, self.released - len(s) + 1))) >= 0]
        if hits:  # cut at the earliest stop string, whichever of them it is
            return text[:min(hits)], True
        return text, False

    def release(self, text: str, final: bool) -> str:
        """The part of `text` that can be shown now and was not shown before."""
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
                end = len(text.rstrip("\ufffd"))
            end = max(self.released, end - self.holdback)
        delta = text[self.released:end]
        self.released = max(self.released, end)
        return delta


class TokenPieces:
    """What each token stands for, as OpenAI's logprobs show it: its bytes, and its string (its
    text; `bytes:\\xNN..` when its bytes are not whole UTF-8 characters; a special token's content)."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        if tokenizer is None:  # ids only: a token is shown as `token_id:N` (as vLLM can)
            self.special, self.byte_level = {}, False
            return
        self.special = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        decoder = tokenizer.decoder
        self.byte_level = decoder is not None and type(decoder).__name__ == "ByteLevel"
        self.unbyte = {c: b for b, c in bytes_to_unicode().items()}

    def bytes_of(self, token: int) -> bytes:
        """The bytes the token adds to the text (b"" for a special token, which decoding skips)."""
        if token in self.special or self.tokenizer is None:
            return b""
        if self.byte_level:
            piece = self.tokenizer.id_to_token(token) or ""
            if all(c in self.unbyte for c in piece):
                return bytes(self.unbyte[c] for c in piece)
        return self.tokenizer.decode([token]).encode()

    def string_of(self, token: int) -> str:
        if token in self.special:
            return self.special[token]
        if self.tokenizer is None:
            return f"token_id:{token}"
        raw = self.bytes_of(token)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
