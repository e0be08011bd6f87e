"""Incremental detokenizing and stop-string hold-back, on real tokenizers."""

from __future__ import annotations

import pytest

from openai_api.text_stream import IncrementalDetokenizer, StopStrings

CHINESE = "你好，世界！我们测试中文流式输出，山峰很高。🙂"


def stream(tokenizer, prompt_ids, ids):
    d = IncrementalDetokenizer(tokenizer, prompt_ids)
    return [d.step(i) for i in ids]


@pytest.fixture(scope="module")
def smollm_tokenizer(embedded_models):
    import bentoml
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bentoml.models.get("smollm2-135m-instruct:latest").path)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir, trust_remote_code=True)


@pytest.mark.parametrize("which", ["smollm_tokenizer", "sentencepiece_tokenizer"])
def test_multibyte_text_streams_intact(request, which):
    tok = request.getfixturevalue(which)
    ids = tok(CHINESE, add_special_tokens=False)["input_ids"]
    prompt = tok("Q:", add_special_tokens=False)["input_ids"]
    pieces = stream(tok, prompt, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert len([p for p in pieces if p]) > 3  # it really streamed, piece by piece


def test_first_word_keeps_its_leading_space_under_sentencepiece(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    ids = tok("The capital of France is Paris", add_special_tokens=False)["input_ids"]
    split = len(tok("The capital of France is", add_special_tokens=False)["input_ids"])
    assert "".join(stream(tok, ids[:split], ids[split:])) == " Paris"


def test_special_tokens_are_not_shown(smollm_tokenizer):
    tok = smollm_tokenizer
    ids = tok("Hello there", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert "".join(stream(tok, [], ids)) == "Hello there"


def feed_all(stops, pieces):
    s = StopStrings(stops)
    shown, stopped = [], False
    for p in pieces:
        out, stopped = s.feed(p)
        shown.append(out)
        if stopped:
            break
    if not stopped:
        shown.append(s.flush())
    return shown, stopped


def test_stop_string_split_across_pieces_is_never_shown():
    shown, stopped = feed_all(["###"], ["Hello #", "#", "# world"])
    assert stopped and "".join(shown) == "Hello "
    assert shown == ["Hello ", "", ""]  # the '#'s were held back, not shown and then taken back


def test_held_text_is_released_when_it_cannot_match():
    shown, stopped = feed_all(["STOP"], ["a ST", "OQ b"])
    assert not stopped and shown == ["a ", "STOQ b", ""]


def test_earliest_of_several_stops_wins_and_flush_returns_held_tail():
    shown, stopped = feed_all(["world", "lo"], ["Hello world"])
    assert stopped and "".join(shown) == "Hel"
    shown, stopped = feed_all(["xyz"], ["abc x"])
    assert not stopped and "".join(shown) == "abc x"


def test_no_stops_passes_everything_through():
    assert feed_all([], ["a", "b"]) == (["a", "b", ""], False)


def test_kept_special_tokens_are_shown_others_not(smollm_tokenizer):
    tok = smollm_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok("Hi there", add_special_tokens=False)["input_ids"] + [im_end]
    assert "".join(stream(tok, [], ids)) == "Hi there"
    d = IncrementalDetokenizer(tok, [], keep=frozenset({im_end}))
    assert "".join(d.step(i) for i in ids) == "Hi there<|im_end|>"
