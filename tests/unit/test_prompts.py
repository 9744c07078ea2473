"""Prompt tokenization is one function for engines, imitation and probes: checked with a BOS-adding tokenizer."""

from __future__ import annotations

from aha.actors.prompts import encode_completion, encode_prompt
from aha.cluster.models import build_char_tokenizer


def bos_tokenizer():
    """The tiny character tokenizer, made to add a BOS (here <bos>) in front of every encoded text."""
    from tokenizers import processors

    tok = build_char_tokenizer(128)
    tok.add_special_tokens({"bos_token": "<bos>"})
    bos = tok.convert_tokens_to_ids("<bos>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)]
    )
    return tok, bos


def test_plain_prompt_gets_the_tokenizers_bos_once():
    tok, bos = bos_tokenizer()
    ids = encode_prompt(tok, "12+3=", chat_template=False)
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.decode(ids[1:]) == "12+3="
    # what vLLM does with the same text prompt (its default add_special_tokens=True)
    assert ids == tok("12+3=")["input_ids"]


def test_chat_prompt_is_not_given_a_second_bos():
    tok, bos = bos_tokenizer()
    tok.chat_template = "<bos>{% for m in messages %}{{ m['content'] }}{% endfor %}="
    ids = encode_prompt(tok, "12+3", chat_template=True)
    assert ids.count(bos) == 1 and tok.decode(ids[1:]) == "12+3="


def test_completion_ends_with_eos_and_adds_no_bos():
    tok, bos = bos_tokenizer()
    ids = encode_completion(tok, "51")
    assert bos not in ids and ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]) == "51"
