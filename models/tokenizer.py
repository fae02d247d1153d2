"""The byte-level tokenizer bundled with small models: 256 byte tokens plus BOS and EOS.

It needs no training data and round-trips any UTF-8 text, so a test or a freshly trained tiny
model always has a tokenizer. Byte value b is token id b.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

BOS_ID = 256
EOS_ID = 257
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character.

    Printable Latin-1 bytes map to themselves; the rest (controls, space, ...) map to 256 + n in
    byte order, so the ByteLevel pre-tokenizer's symbols are exactly these 256 characters.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, shifted = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def byte_level_tokenizer() -> Tokenizer:
    """A byte-level BPE without merges: byte b -> id b, `<|bos|>` -> 256, `<|eos|>` -> 257.

    encode then decode returns the input text unchanged for any UTF-8 string.
    """
    vocab = {symbol: b for b, symbol in bytes_to_unicode().items()}
    vocab[BOS_TOKEN] = BOS_ID
    vocab[EOS_TOKEN] = EOS_ID
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # Registered as special so they are matched whole in text and skipped when decoding.
    tokenizer.add_special_tokens([AddedToken(BOS_TOKEN, special=True, normalized=False),
                                  AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return tokenizer


def default_generation_config() -> dict:
    """generation_config.json content matching `byte_level_tokenizer`."""
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def train_bpe_tokenizer(files: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on `files`: `<|bos|>` is id 0, `<|eos|>` id 1, then the 256 byte
    symbols, then merges up to `vocab_size` tokens. Deterministic for the same files."""
    from tokenizers import trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train(files, trainer)
    return tokenizer
