"""The bundled byte-level tokenizer: byte b is id b, specials are 256/257, text round-trips."""

from tokenizers import Tokenizer

from models.tokenizer import (BOS_ID, EOS_ID, byte_level_tokenizer, bytes_to_unicode,
                              default_generation_config)

TEXTS = ["hello world", "héllo 世界 🙂\n", "  leading spaces\tand tabs\r\n", "", "\x00\x7f\xff"]


def test_round_trip_ascii_and_non_ascii():
    tok = byte_level_tokenizer()
    for text in TEXTS:
        assert tok.decode(tok.encode(text).ids) == text


def test_ids_are_the_utf8_bytes():
    tok = byte_level_tokenizer()
    text = "héllo 世界 🙂\n"
    ids = tok.encode(text).ids
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 258 for i in ids)


def test_special_tokens():
    tok = byte_level_tokenizer()
    assert (BOS_ID, EOS_ID) == (256, 257)
    assert tok.token_to_id("<|bos|>") == BOS_ID and tok.token_to_id("<|eos|>") == EOS_ID
    assert tok.get_vocab_size() == 258
    ids = tok.encode("<|bos|>hi<|eos|>").ids
    assert ids == [BOS_ID, ord("h"), ord("i"), EOS_ID]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|bos|>hi<|eos|>"


def test_byte_mapping_is_a_bijection_onto_printable_symbols():
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert mapping[ord("A")] == "A" and mapping[ord(" ")] == "Ġ"


def test_survives_save_and_load(tmp_path):
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.encode("héllo 世界 🙂\n").ids == list("héllo 世界 🙂\n".encode("utf-8"))
    assert tok.token_to_id("<|eos|>") == EOS_ID


def test_default_generation_config():
    assert default_generation_config() == {"bos_token_id": 256, "eos_token_id": 257}
