"""Tokenizers built in memory (nothing downloaded): word-level BPE (CLIP) and Unigram (T5) vocabularies.

The vocabulary covers the captions of the procedural shapes data set (colours, shapes, sizes, positions) plus
common English words, so that tiny and trained checkpoints tokenize real prompts into words, not characters.
"""

from __future__ import annotations

import string

WORDS: tuple[str, ...] = tuple(dict.fromkeys(["a", "an", "the", "of", "on", "in", "at", "to", "with", "and", "or", "is", "are", "be", "by", "for", "from", "as", "it", "its", "this", "that", "one", "two", "three", "some", "no", "not", "large", "small", "big", "tiny", "medium", "left", "right", "center", "centre", "middle", "top", "bottom", "upper", "lower", "corner", "side", "near", "far", "above", "below", "beside", "next", "between", "background", "foreground", "plain", "two-tone", "tone", "split", "half", "red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray", "grey", "brown", "cyan", "magenta", "teal", "navy", "gold", "silver", "circle", "square", "triangle", "star", "diamond", "hexagon", "heart", "cross", "ring", "dot", "shape", "shapes", "cat", "dog", "bird", "tree", "house", "car", "boat", "sky", "sea", "sun", "moon", "mountain", "river", "city", "street", "road", "forest", "flower", "flowers", "photo", "picture", "painting", "drawing", "image", "render", "illustration", "style", "art", "portrait", "landscape", "beautiful", "bright", "dark", "light", "colorful", "colourful", "simple", "detailed", "sharp", "soft", "high", "quality", "man", "woman", "person", "people", "child", "face", "hand", "hands", "eye", "eyes", "hair", "holding", "sign", "says", "hello", "world"]))


def _chars() -> list[str]:
    return list(string.ascii_lowercase + string.digits + string.punctuation)


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary (``</w>`` marks word ends) trained in memory on WORDS, so every word of
    WORDS is one token and any other text still tokenizes (into characters)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["<|startoftext|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = _chars()
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, end_of_word_suffix="</w>",
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(list(WORDS) + alphabet, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = {}
    for piece in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    for c in alphabet:  # single characters at word ends
        vocab.setdefault(c + "</w>", len(vocab))
    for s in specials:
        vocab.setdefault(s, len(vocab))
    merges = [tuple(m) for m in model["merges"]]
    return vocab, merges


def t5_unigram_vocab() -> list[tuple[str, float]]:
    """A Unigram vocabulary in T5 order: <pad>=0, </s>=1, <unk>=2, then words (preferred) and characters."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -2.0) for w in WORDS]
    vocab += [("\u2581", -4.0)]
    vocab += [(c, -8.0) for c in _chars()]
    return vocab


def make_clip_tokenizer(model_max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def make_t5_tokenizer(model_max_length: int = 512):
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_unigram_vocab(), extra_ids=0, model_max_length=model_max_length)
