"""Field types the HTTP API enforces beyond pydantic's defaults.

- `Text`: a string that is valid Unicode. JSON may carry a lone UTF-16 surrogate (`"\\ud800"`),
  which Python keeps but no tokenizer can encode: refused here with a 422, not a 500 later.
- `Int`: a JSON integer. `true` and `"7"` are refused; `7.0` is taken as 7, since JSON Schema (and
  so the OpenAPI document) counts it as an integer, while `7.5` is refused.
- `QueryInt`: a query-string integer written in digits only (`?exit_layer=18.0` and `?exit_layer=1e1`
  are refused rather than silently converted). Body integers are strict through the models'
  `strict=True` with `Int`.
- `StopList`: at most MAX_STOP strings of at most MAX_STOP_CHARS characters each; every stop
  string is searched for at every token, so the list must stay small.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field

MAX_STOP = 16
MAX_STOP_CHARS = 256


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds a lone UTF-16 surrogate at character {e.start}: "
                         "send valid Unicode") from None
    return text


def valid_unicode_within(value):
    """`value` (JSON: strings, numbers, lists, objects) if every string in it, keys too, is valid
    Unicode; ValueError names the first that is not."""
    if isinstance(value, str):
        return _valid_unicode(value)
    if isinstance(value, dict):
        for key, item in value.items():
            valid_unicode_within(key)
            valid_unicode_within(item)
    elif isinstance(value, list):
        for item in value:
            valid_unicode_within(item)
    return value


def _digits_only(value):
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be an integer written in digits")
    return value


def _integral(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
Int = Annotated[int, BeforeValidator(_integral)]  # in a strict model
QueryInt = Annotated[int, BeforeValidator(_digits_only)]
StopString = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP)]
