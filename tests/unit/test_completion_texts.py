"""The engine's batch detokenization (`completion_texts`) against vLLM's own incremental detokenizer: a
`tokenizers.DecodeStream` primed with the prompt, one step per token, the stop token left out (what vLLM's
FastIncrementalDetokenizer does with skip_special_tokens=True and no stop strings). Three kinds of tokenizer,
built here: the tiny model's characters, a byte-level BPE (GPT-2, Qwen, SmolLM2 family) and a SentencePiece-style
BPE with byte fallback whose decoder drops the leading space (Llama 2, Mistral family)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.decoders import DecodeStream

from aha.actors.engine import completion_texts
from aha.cluster.models import build_char_tokenizer

CORPUS = [
    "The answer is 42. Hello, world! naïve café, déjà vu.",
    "こんにちは 世界 🎉🎉 emoji 👩‍👩‍👧 family ünïcödé",
    "def f(x):\n    return x**2 + 1  # squared\n",
    "123+456=579 and 999+1=1000; 7*8=56",
    "  leading spaces and\ttabs, <eos> as text",
]
SPECIALS = ["<eos>", "<pad>", "<|im_start|>"]
PROMPTS = ["Q: add 123+456\nA:", "<|im_start|>user\nhi\n<|im_start|>", "1+1=", "Bonjour ", "x"]


def byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok


def sentencepiece_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", *SPECIALS, *alphabet])
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok


def vllm_text(tok: Tokenizer, prompt: list[int], completion: list[int], stopped: bool) -> str:
    stream = DecodeStream(ids=prompt, skip_special_tokens=True)
    return "".join(stream.step(tok, t) or "" for t in (completion[:-1] if stopped else completion))


def cases(tok: Tokenizer, count: int, seed: int = 0):
    """Prompts with completions of random tokens, of slices of real text (cut mid-word and mid-character),
    with special tokens inside, some ending on the stop token."""
    rng = random.Random(seed)
    vocab, eos = tok.get_vocab_size(), tok.token_to_id("<eos>")
    special = [i for i in map(tok.token_to_id, SPECIALS) if i is not None]
    for _ in range(count):
        prompt = tok.encode(rng.choice(PROMPTS), add_special_tokens=False).ids
        kind = rng.random()
        if kind < 0.4:
            ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
        elif kind < 0.8:
            text = tok.encode(rng.choice(CORPUS), add_special_tokens=False).ids
            start = rng.randrange(len(text))
            ids = text[start : start + rng.randint(1, 8)]
        else:
            ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 4))] + [rng.choice(special)]
            ids += [rng.randrange(vocab) for _ in range(rng.randint(0, 3))]
        stopped = rng.random() < 0.3
        yield prompt, ids + [eos] if stopped else ids, stopped


@pytest.mark.parametrize(
    "build", [lambda: build_char_tokenizer(128)._tokenizer, byte_level_bpe, sentencepiece_bpe]
)
def test_batch_decode_gives_vllms_text(build):
    tok = build()
    batch = list(cases(tok, 1500))
    want = [vllm_text(tok, *case) for case in batch]
    got = completion_texts(tok, [p for p, _, _ in batch], [c for _, c, _ in batch], [s for *_, s in batch])
    assert got == want
    assert any(w.startswith(" ") for w in want) and any(s for *_, s in batch)  # the cases reach the edges


def test_a_character_cut_by_max_tokens_is_held_back():
    tok = byte_level_bpe()
    prompt = tok.encode("x", add_special_tokens=False).ids
    byte_chars = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str("ok 🎉")
    ids = [tok.token_to_id(c) for c in byte_chars[0][0]]  # one token per byte: 🎉 takes four
    assert completion_texts(tok, [prompt], [ids], [False]) == ["ok 🎉"]
    for cut in (1, 2, 3):
        assert vllm_text(tok, prompt, ids[:-cut], False) == "ok "
        assert completion_texts(tok, [prompt], [ids[:-cut]], [False]) == ["ok "]
