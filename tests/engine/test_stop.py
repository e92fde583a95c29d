"""Stop strings and incremental text with the real o200k_harmony tokenizer: cuts where a stop string begins
even when it straddles tokens, never emits it, holds back what could still become one."""

from __future__ import annotations

import pytest

from gptoss_serve.cluster.engine.stop import TextState
from gptoss_serve.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def feed(state: TextState, token_ids: list[int]) -> tuple[str | None, int]:
    """Appends tokens until a stop string matches; (the stop string, tokens consumed)."""
    for i, token_id in enumerate(token_ids):
        stop = state.append(token_id)
        if stop is not None:
            return stop, i + 1
    return None, len(token_ids)


def test_text_equals_decode_even_when_characters_straddle_tokens(tokenizer):
    text = "naïve 🤖 b 🦀 c, 你好"  # the crab's four bytes come in three tokens
    ids = tokenizer.encode(text)
    state = TextState(tokenizer)
    seen = []
    for token_id in ids:
        state.append(token_id)
        seen.append(state.text)
        assert "\ufffd" not in state.text  # half a character is held inside the decoder, never shown
    assert state.text == text
    assert any(a == b for a, b in zip(seen, seen[1:]))  # some token added no complete character yet


def test_stop_string_straddling_tokens_is_cut(tokenizer):
    text = "The answer is forty-two. Done here"
    ids = tokenizer.encode(text)
    stop = "two. D"
    assert not any(stop in tokenizer.decode([i]) for i in ids)  # no single token holds it
    state = TextState(tokenizer, stop=(stop, "never"))
    matched, consumed = feed(state, ids)
    assert matched == stop and state.text == "The answer is forty-"
    assert tokenizer.decode(ids[:consumed]).endswith("D") or stop in tokenizer.decode(ids[:consumed])
    kept = TextState(tokenizer, stop=(stop,), include_stop_str_in_output=True)
    feed(kept, ids)
    assert kept.text == "The answer is forty-two. D"


def test_the_stop_string_that_starts_first_wins(tokenizer):
    state = TextState(tokenizer, stop=("cd", "abcdef"))
    matched, _ = feed(state, tokenizer.encode("xx abcdef yy"))
    assert matched == "abcdef" and state.text == "xx "


def test_streaming_holds_back_a_possible_stop_prefix(tokenizer):
    state = TextState(tokenizer, stop=("STOP!",))
    for token_id in tokenizer.encode("go on ST"):
        state.append(token_id)
    assert state.text == "go on ST"
    assert state.text[:state.stable_len(finished=False)] == "go on "  # "ST" may become "STOP!"
    assert state.stable_len(finished=True) == len(state.text)
    for token_id in tokenizer.encode("ART"):
        state.append(token_id)
    assert state.text[:state.stable_len(finished=False)] == "go on START"


def test_special_tokens_are_left_out_of_the_text(tokenizer):
    ids = tokenizer.encode("<|channel|>final<|message|>Hi", allow_special=True)
    skipping = TextState(tokenizer)
    feed(skipping, ids)
    assert skipping.text == "finalHi"
    keeping = TextState(tokenizer, skip_special_tokens=False)
    feed(keeping, ids)
    assert keeping.text == "<|channel|>final<|message|>Hi"


def test_no_tokenizer_gives_empty_text():
    state = TextState(None)
    assert state.append(5) is None and state.text == ""
