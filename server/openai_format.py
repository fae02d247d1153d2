"""OpenAI's shapes for logprobs: /v1/completions' `tokens`, `token_logprobs`, `top_logprobs`,
`text_offset` columns, and /v1/chat/completions' `content` list of entries with `bytes`."""

from __future__ import annotations

import codecs

from engine.detokenizer import TokenPieces
from engine.logprobs import TokenLogprob


class CompletionLogprobs:
    """The completions logprobs object of one choice, built as its tokens arrive (streaming sends
    each part as it comes; `text_offset` runs on over the parts)."""

    def __init__(self, pieces: TokenPieces):
        self.pieces = pieces
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.at = 0  # characters of text so far

    def part(self, tokens: list[int], entries: list[TokenLogprob | None]) -> dict:
        """The object for the next `tokens` (an entry of None: no logprob, as for the first
        prompt token)."""
        s = self.pieces.string_of
        offsets = []
        for t in tokens:
            # the length of the text before the token (an unfinished character counts as one)
            offsets.append(self.at + bool(self.decoder.getstate()[0]))
            self.at += len(self.decoder.decode(self.pieces.bytes_of(t)))
        return {"tokens": [s(t) for t in tokens],
                "token_logprobs": [None if e is None else e.logprob for e in entries],
                "top_logprobs": [None if e is None else {**{s(i): lp for i, lp in e.top}, s(e.token): e.logprob}
                                 for e in entries],
                "text_offset": offsets}

    def skip_text(self, text: str) -> None:
        """Text before the logged tokens (an echoed prompt without logprobs)."""
        self.at += len(text)


def merge(a: dict, b: dict) -> dict:
    """Two consecutive parts of a completions logprobs object as one."""
    return {k: a[k] + b[k] for k in a}


def chat_logprobs(pieces: TokenPieces, entries: list[TokenLogprob]) -> dict:
    """The chat logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(token: int, logprob: float) -> dict:
        text = pieces.string_of(token)
        raw = pieces.bytes_of(token) or text.encode()
        return {"token": text, "logprob": logprob, "bytes": list(raw)}
    return {"content": [{**entry(e.token, e.logprob), "top_logprobs": [entry(i, lp) for i, lp in e.top]}
                        for e in entries]}
