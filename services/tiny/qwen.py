"""Qwen2/Qwen3 text side of the tiny checkpoints: byte-level BPE tokenizers built in memory (nothing downloaded)
and Qwen3 text-encoder configs.

Qwen2.5-VL (Qwen-Image) and Qwen3 (FLUX.2-klein, Z-Image) share the Qwen2 tokenizer: GPT-2 style byte-level BPE
with the ``<|im_start|>``/``<|im_end|>`` chat markers. The vocabulary here is the 256 byte symbols plus merges
trained on the shared word list (``services.tiny.tokenizers.WORDS``, each word with and without its leading space),
so prompts made of those words tokenize into one token per word and anything else still tokenizes (into bytes).

The chat template renders the two cases the image pipelines use the way Qwen3's template does: a user turn, then
the assistant prompt, with an empty ``<think></think>`` block when ``enable_thinking=False`` (FLUX.2-klein) and
without it when thinking is enabled (Z-Image).
"""

from __future__ import annotations

from typing import Any

from services.tiny.tokenizers import WORDS

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Special tokens, in id order after the BPE vocabulary (``<|endoftext|>`` is also the pad token)."""
THINK_TOKENS = ("<think>", "</think>")
"""Added (non-special) tokens of Qwen3's reasoning markers."""
TEMPLATE_WORDS = ("system", "user", "assistant", "Describe", "describe", "detailing", "color", "shape", "size",
                  "texture", "quantity", "text", "spatial", "relationships", "objects", "background", "image")
"""Words of the pipelines' prompt templates, so that Qwen-Image's system prefix is 34 tokens as with the real
tokenizer (the pipeline drops exactly that many)."""

QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)
"""Qwen3's chat template restricted to plain text turns (what the pipelines render)."""


def byte_level_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges trained on WORDS (with and without a leading space)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [w for word in (*WORDS, *TEMPLATE_WORDS) for w in (word, " " + word)]
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = {}
    for piece in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return vocab, merges


def make_qwen_tokenizer(model_max_length: int = 512, chat_template: str | None = QWEN3_CHAT_TEMPLATE) -> Any:
    """A ``Qwen2Tokenizer`` (the class Qwen2.5-VL and Qwen3 checkpoints use) over the in-memory vocabulary."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = byte_level_vocab_and_merges()
    for token in SPECIAL_TOKENS + THINK_TOKENS:
        vocab.setdefault(token, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length,
                         additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def qwen3_config(vocab: int, hidden: int = 16, layers: int = 28, heads: int = 2, kv_heads: int = 1,
                 head_dim: int = 8, intermediate: int = 32, real: bool = False) -> Any:
    """A Qwen3 text-model config: toy sizes by default, Qwen3-4B's with ``real=True`` (FLUX.2-klein-4B and Z-Image
    both use Qwen3-4B). 28 toy layers because FLUX.2-klein reads hidden states 9, 18 and 27."""
    from transformers import Qwen3Config

    if real:
        return Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                           rms_norm_eps=1e-6, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                           bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                       max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
