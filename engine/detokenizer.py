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
        # A byte-level tokenizer's text is the UTF-8 of its tokens' bytes, invalid bytes replaced:
        # after a byte below 0x80 nothing that follows changes the text before it. So the text up
        # to the last token ending in such a byte is kept (`fixed` tokens), and each update decodes
        # only the tokens after it, not the whole output again.
        self._splits = _AsciiEnds.of(tokenizer)
        self._fixed, self._fixed_text = 0, ""

    def update(self, output_ids: list[int], check_stop: bool = True) -> tuple[str, bool]:
        """Full text of `output_ids` (the request's output so far, a list that only grows; cut
        before the first stop string, when `check_stop`) and whether one was hit."""
        if self.tokenizer is None:  # token ids only: there is no text
            return "", False
        text = self._decode(output_ids)
        if not check_stop:
            return text, False
        hits = [at for s in self.stop if (at := text.find(s, max(0, self.released - len(s) + 1))) >= 0]
        if hits:  # cut at the earliest stop string, whichever of them it is
            return text[:min(hits)], True
        return text, False

    def _decode(self, ids: list[int]) -> str:
        if self._splits is None or len(ids) < self._fixed:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        split = next((i for i in range(len(ids) - 1, self._fixed - 1, -1) if self._splits.ends(ids[i])), None)
        if split is not None and split + 1 > self._fixed:
            self._fixed_text += self.tokenizer.decode(ids[self._fixed:split + 1], skip_special_tokens=True)
            self._fixed = split + 1
        return self._fixed_text + self.tokenizer.decode(ids[self._fixed:], skip_special_tokens=True)

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


class _AsciiEnds:
    """Which tokens of a byte-level tokenizer end in a byte below 0x80 (vocabulary tokens only;
    added tokens never count), asked token by token and remembered."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.added = set(tokenizer.get_added_tokens_decoder())
        self.unbyte = {c: b for b, c in bytes_to_unicode().items()}
        self.known: dict[int, bool] = {}

    @classmethod
    def of(cls, tokenizer: Tokenizer | None) -> _AsciiEnds | None:
        """For a tokenizer whose decoder is the byte-level one alone, else None."""
        decoder = tokenizer.decoder if tokenizer is not None else None
        return cls(tokenizer) if decoder is not None and type(decoder).__name__ == "ByteLevel" else None

    def ends(self, token: int) -> bool:
        known = self.known.get(token)
        if known is None:
            piece = self.tokenizer.id_to_token(token) if token not in self.added else None
            # (a piece with a character outside the byte map decodes as its own UTF-8: never counted)
            known = self.known[token] = bool(piece) and all(c in self.unbyte for c in piece) \
                and self.unbyte[piece[-1]] < 128
        return known


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
