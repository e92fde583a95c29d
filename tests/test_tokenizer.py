"""o200k_harmony: vocabulary layout, special ids, round trips, equality with openai_harmony, vocab file checks."""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import shutil

import pytest

from gptoss_serve.model.tokenizer import (
    NUM_MERGEABLE_TOKENS,
    SPECIAL_TOKEN_IDS,
    STOP_IDS,
    STOP_IDS_ASSISTANT_ACTIONS,
    VOCAB_FILE_NAME,
    VOCAB_SHA256,
    VOCAB_SIZE,
    SpecialToken,
    VocabHashError,
    load_tokenizer,
    vocab_dir,
)

SPEC_SPECIAL_NAMES = {  # the table in the gpt-oss reference, section 4
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
    200018: "<|endofprompt|>",
}

TEXT_CORPUS = [
    "",
    "hello world",
    "Hello, World! How's it going? I'd say we'll've done it.",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\nand more\n",
    "numbers 1234567890 3.14159 -42 1e10 0x1F",
    "naïve café résumé Zürich Ångström",
    "日本語のテキストと中文文本，还有한국어 텍스트",
    "Русский текст и ελληνικά",
    "עברית ועربي مكتوب من اليمين",
    "emoji 🙂👍🏽👨‍👩‍👧‍👦🇨🇭 and symbols ∑∫√∞ ≠ ≤",
    "combining: e\u0301 a\u0308 and zero\u200bwidth",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    '{"location": "San Francisco, CA", "unit": "celsius"}',
    "<|start|>assistant<|channel|>final<|message|>looks special but is text<|end|>",
    "<|reserved_200100|> <|endofprompt|> <|startoftext|>",
    "mixed CASE WORDS and camelCaseIdentifiers and snake_case_names",
    "https://example.com/path?query=1&b=2#frag",
    "\u0000 control \u0007 chars \u001f",
    "a" * 500,
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def harmony_encoding():
    """openai_harmony's encoding, reading our verified vocab through TIKTOKEN_ENCODINGS_BASE."""
    openai_harmony = pytest.importorskip("openai_harmony")
    previous = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(vocab_dir())
    try:
        yield openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_ENCODINGS_BASE"]
        else:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = previous


def _random_texts(num_texts: int, seed: int) -> list[str]:
    """Random strings over ASCII, Latin, Cyrillic, CJK, emoji and whitespace (no lone surrogates)."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    texts = []
    for _ in range(num_texts):
        chars = []
        for _ in range(rng.randint(1, 60)):
            low, high = rng.choice(ranges)
            chars.append(chr(rng.randint(low, high)))
        texts.append("".join(chars))
    return texts


def test_vocab_size_and_id_range(tokenizer):
    assert tokenizer.vocab_size == VOCAB_SIZE == 201088
    assert len(tokenizer.decode_bytes(list(range(VOCAB_SIZE)))) > 0  # every id decodes
    for bad_id in (VOCAB_SIZE, -1):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tokenizer.token_bytes(bad_id)


def test_special_ids_match_the_spec_table(tokenizer):
    assert len(SPECIAL_TOKEN_IDS) == VOCAB_SIZE - NUM_MERGEABLE_TOKENS
    for token_id in range(NUM_MERGEABLE_TOKENS, VOCAB_SIZE):
        expected_name = SPEC_SPECIAL_NAMES.get(token_id, f"<|reserved_{token_id}|>")
        assert tokenizer.special_name(token_id) == expected_name
        assert SPECIAL_TOKEN_IDS[expected_name] == token_id
    assert {int(token) for token in SpecialToken} == set(SPEC_SPECIAL_NAMES)
    assert not tokenizer.is_special(NUM_MERGEABLE_TOKENS - 1)


def test_special_names_encode_only_when_allowed(tokenizer):
    text = "".join(SPECIAL_TOKEN_IDS)
    assert tokenizer.encode(text, allow_special=True) == list(SPECIAL_TOKEN_IDS.values())
    ordinary_ids = tokenizer.encode(text)
    assert all(token_id < NUM_MERGEABLE_TOKENS for token_id in ordinary_ids)
    assert tokenizer.decode(ordinary_ids) == text


@pytest.mark.parametrize("text", TEXT_CORPUS)
def test_round_trip(tokenizer, text):
    token_ids = tokenizer.encode(text)
    assert tokenizer.decode(token_ids) == text
    assert b"".join(tokenizer.token_bytes(token_id) for token_id in token_ids) == text.encode()


def test_matches_openai_harmony_on_corpus(tokenizer, harmony_encoding):
    for text in TEXT_CORPUS + _random_texts(300, seed=1234):
        assert tokenizer.encode(text) == harmony_encoding.encode(text, disallowed_special=()), text
        # openai_harmony does not know <|endofprompt|> by name; it calls id 200018 <|reserved_200018|>.
        special_text = text.replace("<|endofprompt|>", "")
        expected_ids = harmony_encoding.encode(special_text, allowed_special="all")
        assert tokenizer.encode(special_text, allow_special=True) == expected_ids


def test_stop_ids_match_openai_harmony(harmony_encoding):
    assert set(harmony_encoding.stop_tokens()) == STOP_IDS
    assert set(harmony_encoding.stop_tokens_for_assistant_actions()) == STOP_IDS_ASSISTANT_ACTIONS


def test_decode_matches_openai_harmony(tokenizer, harmony_encoding):
    special_ids = [i for i in range(NUM_MERGEABLE_TOKENS, VOCAB_SIZE) if i != SpecialToken.ENDOFPROMPT]
    assert tokenizer.decode(special_ids) == harmony_encoding.decode(special_ids)
    rng = random.Random(7)
    for _ in range(200):
        token_ids = [rng.randrange(NUM_MERGEABLE_TOKENS) for _ in range(rng.randint(1, 20))]
        assert tokenizer.decode(token_ids) == harmony_encoding.decode(token_ids)  # same U+FFFD replacement
        assert tokenizer.decode_bytes(token_ids) == bytes(harmony_encoding._inner.decode_bytes(token_ids))


def test_load_is_cached_once_per_process():
    assert load_tokenizer() is load_tokenizer()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPTOSS_SERVE_CACHE", str(cache))
    return cache


def _sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cache_is_filled_from_the_packaged_vocab_and_repaired(empty_cache):
    assert vocab_dir() == empty_cache
    cached_file = empty_cache / VOCAB_FILE_NAME
    assert _sha256_of(cached_file) == VOCAB_SHA256
    cached_file.write_bytes(b"dGVzdA== 0\n")  # a corrupt cache is ours to rewrite
    assert vocab_dir() == empty_cache
    assert _sha256_of(cached_file) == VOCAB_SHA256


def test_model_dir_vocab_is_preferred(tmp_path, empty_cache):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(vocab_dir() / VOCAB_FILE_NAME, model_dir / VOCAB_FILE_NAME)
    assert vocab_dir(model_dir) == model_dir

    gz_model_dir = tmp_path / "gz_model"
    gz_model_dir.mkdir()
    (gz_model_dir / f"{VOCAB_FILE_NAME}.gz").write_bytes(gzip.compress((model_dir / VOCAB_FILE_NAME).read_bytes()))
    (empty_cache / VOCAB_FILE_NAME).unlink()
    assert vocab_dir(gz_model_dir) == empty_cache  # unpacked into the cache
    assert _sha256_of(empty_cache / VOCAB_FILE_NAME) == VOCAB_SHA256


@pytest.mark.parametrize(
    "file_name, payload",
    [
        (VOCAB_FILE_NAME, b"IQ== 0\nIg== 1\n"),
        (f"{VOCAB_FILE_NAME}.gz", gzip.compress(b"IQ== 0\n")),
        (f"{VOCAB_FILE_NAME}.gz", b"not gzip at all"),
    ],
)
def test_corrupt_model_dir_vocab_fails_clearly(tmp_path, empty_cache, file_name, payload):
    (tmp_path / file_name).write_bytes(payload)
    with pytest.raises(VocabHashError, match=f"{VOCAB_FILE_NAME}.*(sha256|gzip)") as error:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(error.value)
    if file_name == VOCAB_FILE_NAME:
        assert VOCAB_SHA256 in str(error.value)
