"""The procedural shapes data set: vocabulary, captions, held-out split, renderer pixels, the adherence classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.shapes import scenes as S
from services.shapes.evaluate import HEADS, WEIGHTS, adherence, check, classify, load_classifier, targets_of
from services.shapes.render import render, to_uint8
from services.tiny.tokenizers import WORDS, make_clip_tokenizer, make_t5_tokenizer


def test_vocabulary_covers_the_issue() -> None:
    assert {"circle", "square", "triangle", "star"} <= set(S.SHAPES)
    assert len(S.COLOURS) >= 8 and len(S.SIZES) == 2 and len(S.POSITIONS) == 5
    assert len(set(S.RGB)) == len(S.COLOURS)
    s = S.sample_scenes(4000, seed=1)
    assert set(s.colour) == set(range(S.N_COLOURS)) and set(s.shape) == set(range(S.N_SHAPES))
    assert set(s.size) == {0, 1} and set(s.position) == set(range(S.N_POSITIONS))
    assert 0.2 < (s.bg2 >= 0).mean() < 0.4, "two-tone backgrounds"
    assert 0.2 < (s.colour2 >= 0).mean() < 0.4, "two-shape scenes"


def test_sampling_is_seeded_and_follows_the_rules() -> None:
    a, b, c = S.sample_scenes(500, seed=3), S.sample_scenes(500, seed=3), S.sample_scenes(500, seed=4)
    assert a.captions() == b.captions() and np.array_equal(a.dx, b.dx)
    assert a.captions() != c.captions()
    s = S.sample_scenes(5000, seed=5)
    assert not ((s.colour == s.bg) | (s.colour == s.bg2)).any(), "a shape coloured like its background"
    two = s.colour2 >= 0
    assert not ((s.colour2 == s.bg) | (s.colour2 == s.bg2))[two].any()
    assert (s.size[two] == 1).all() and (s.position2[two] != s.position[two]).all()


def test_heldout_triples_never_in_training() -> None:
    held = set(S.HELDOUT_TRIPLES)
    assert len(held) == 32
    train = S.sample_scenes(20000, seed=11, split="train").triples()
    assert not train & held
    assert len(S.sample_scenes(20000, seed=11, split="all").triples() & held) == 32
    pairs = {(c, s) for c, s, _ in held}
    assert len(pairs) == 32, "each (colour, shape) pair loses at most one position"
    assert {(s, p) for _, s, p in held} <= {(s, p) for _, s, p in train}, "every (shape, position) still trained"


def test_heldout_captions_round_trip() -> None:
    h = S.heldout_scenes()
    caps = h.captions()
    assert len(caps) == 64 and len(set(caps)) == 64
    assert {(c, s, p) for c, s, p in zip(h.colour, h.shape, h.position, strict=True)} == set(S.HELDOUT_TRIPLES)
    assert caps[0] == "a large red triangle in the center, on a blue background"
    for cap in caps + S.sample_scenes(300, seed=2).captions():
        assert S.parse_caption(cap).captions() == [cap]
    with pytest.raises(ValueError, match="colour"):
        S.parse_caption("a large mauve circle on the left, on a blue background")
    with pytest.raises(ValueError, match="position"):
        S.parse_caption("a large red circle somewhere, on a blue background")


def test_caption_words_are_whole_tokens() -> None:
    """Every caption word is in WORDS, and both tokenizers keep it one token (the comma is its own token)."""
    clip, t5 = make_clip_tokenizer(77), make_t5_tokenizer(64)
    caps = S.sample_scenes(400, seed=8, split="all").captions() + S.heldout_captions()
    for cap in caps:
        words = cap.replace(",", " ,").split()
        assert set(words) - {","} <= set(WORDS), cap
        assert len(clip(cap).input_ids) == len(words) + 2, cap  # + BOS and EOS
        assert len(t5(cap).input_ids) == len(words) + 1, cap  # + EOS


def test_render_draws_what_the_caption_says() -> None:
    scenes = S.parse_caption("a large red circle on the left, on a blue and white background")
    scenes = S.Scenes.concat([scenes, S.parse_caption("a small yellow star at the top and a small green square "
                                                      "in the center, on a black background")])
    scenes.size[1] = 1  # main shapes of two-shape scenes are large
    img = to_uint8(render(scenes)).astype(int)
    rgb = np.array(S.RGB)
    assert (img[0, 64, 32] == rgb[0]).all(), "circle centre (x=32, y=64) is red"
    assert (img[0, 2, 2] == rgb[2]).all() and (img[0, 125, 125] == rgb[8]).all(), "top blue, bottom white"
    assert (img[0, 40, 96] == rgb[2]).all() and (img[0, 90, 96] == rgb[8]).all(), "nothing on the right"
    assert (img[1, 32, 64] == rgb[3]).all() and (img[1, 64, 64] == rgb[1]).all() and (img[1, 100, 20] == rgb[9]).all()
    red = (np.abs(img[0] - rgb[0]).sum(-1) < 30)
    ys, xs = np.nonzero(red)
    assert abs(xs.mean() - 32) < 1.5 and abs(ys.mean() - 64) < 1.5
    assert abs(red.sum() - np.pi * 24**2) / (np.pi * 24**2) < 0.05, "large radius 24"


def test_render_is_deterministic_and_antialiased() -> None:
    s = S.sample_scenes(16, seed=21)
    a, b = render(s), render(s)
    assert torch.equal(a, b) and a.shape == (16, 3, 128, 128)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    levels = torch.unique((a * 255).round())
    assert len(levels) > 20, "edges are blended (supersampled), not binary"


def test_classifier_reads_fresh_scenes() -> None:
    """Near-perfect on scenes it never saw (seed outside its training stream), clean and degraded like generated
    images are; the committed weights stay under 2 MB."""
    assert WEIGHTS.stat().st_size < 2 * 2**20
    model = load_classifier()
    clean = check(model, n=600, seed=424242)
    degraded = check(model, n=600, seed=424243, augmented=True)
    assert set(clean) == set(HEADS)
    assert min(clean.values()) >= 0.99, clean
    assert min(degraded.values()) >= 0.97, degraded


def test_adherence_scores_agreement_and_disagreement() -> None:
    model = load_classifier()
    h = S.heldout_scenes()[:16]
    preds = classify(model, to_uint8(render(h)))
    acc = adherence(preds, h)
    assert acc["all"] == 1.0 and acc["colour"] == 1.0
    shifted = S.Scenes(**{**h.__dict__, "position": (h.position + 1) % S.N_POSITIONS})
    assert adherence(preds, shifted)["position"] == 0.0
    assert adherence(preds, shifted)["all"] == 0.0
    assert torch.equal(targets_of(h)["background2"], torch.zeros(16, dtype=torch.long))


def test_default_checkpoint_is_the_trained_model_when_present(tmp_path) -> None:
    from services.assets import EMBEDDED_CHECKPOINT, TINY_DEFAULT_NAME, default_checkpoint

    assert EMBEDDED_CHECKPOINT.name == "chitu-shapes-flux" and EMBEDDED_CHECKPOINT.parent.name == "checkpoints"
    embedded = tmp_path / "chitu-shapes-flux"
    assert default_checkpoint(embedded).name == TINY_DEFAULT_NAME
    embedded.mkdir()
    (embedded / "model_index.json").write_text("{}")
    assert default_checkpoint(embedded) == embedded
