"""Scene vocabulary, seeded scene sampling, captions and the held-out split of the procedural shapes data set.

A scene is one *main* shape (colour, shape, size, position) on a plain or two-tone background, sometimes with a
second, small shape at another position. Captions name every attribute:

    "a large red circle on the left, on a blue background"
    "a small green star at the top, on a white and black background"        (two-tone: top half, bottom half)
    "a large blue square in the center and a small yellow triangle on the right, on a pink background"

Conventions that keep the attributes unambiguous for the evaluator: in a two-shape scene the main shape is large
and the second one small, and the second shape is drawn first (the main shape is never covered); shape colours
differ from every background colour.

Held-out split: 32 colour-shape-position triples (``HELDOUT_TRIPLES``) never appear in training scenes, neither as
the main nor as the second shape; the 64 evaluation captions (``heldout_scenes``) put each of them once large and
once small on a plain background.

Everything is a pure function of its seed (numpy ``PCG64``); nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import numpy as np

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "white", "black")
"""Colour names, index = colour id."""
RGB: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40), (40, 170, 60), (40, 80, 220), (245, 215, 40), (245, 140, 30),
    (140, 60, 190), (245, 140, 200), (60, 210, 225), (245, 245, 245), (20, 20, 20),
)
"""sRGB value of each colour, same order as ``COLOURS``."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
RADIUS: tuple[float, ...] = (12.0, 24.0)
"""Nominal radius in pixels (of a 128x128 image) of each size; shapes scale it by up to +-8%."""
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
CENTRES: tuple[tuple[float, float], ...] = ((32.0, 64.0), (96.0, 64.0), (64.0, 32.0), (64.0, 96.0), (64.0, 64.0))
"""(x, y) centre in pixels of each position; shapes move by up to +-JITTER pixels."""
PHRASES: tuple[str, ...] = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
JITTER = 4.0
IMAGE_SIZE = 128

N_COLOURS, N_SHAPES, N_SIZES, N_POSITIONS = len(COLOURS), len(SHAPES), len(SIZES), len(POSITIONS)

HELDOUT_TRIPLES: tuple[tuple[int, int, int], ...] = tuple(
    (c, s, p) for c in range(N_COLOURS) for s in range(N_SHAPES) for p in range(N_POSITIONS) if (c + s + p + 2) % 8 == 0)
"""(colour, shape, position) ids never seen in training: 32 triples; every (colour, shape) and (colour, position)
pair loses at most one position/shape, and every (shape, position) pair stays in training with >= 8 colours."""

P_TWO_TONE = 0.3
"""Share of training scenes with a two-tone background."""
P_SECOND = 0.3
"""Share of training scenes whose (large) main shape has a small second shape."""

Split = Literal["train", "all"]


@dataclass
class Scenes:
    """A batch of scenes as parallel integer/float arrays (one row per scene); -1 marks an absent attribute."""

    colour: np.ndarray
    shape: np.ndarray
    size: np.ndarray
    position: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    scale: np.ndarray
    bg: np.ndarray
    bg2: np.ndarray
    """Bottom-half colour of a two-tone background; -1 for a plain one."""
    colour2: np.ndarray
    """Second shape's colour; -1 when the scene has one shape (then shape2/position2 are -1 too)."""
    shape2: np.ndarray
    position2: np.ndarray
    dx2: np.ndarray
    dy2: np.ndarray
    scale2: np.ndarray

    def __len__(self) -> int:
        return len(self.colour)

    def __getitem__(self, index: int | slice | np.ndarray) -> Scenes:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Scenes(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def concat(parts: list[Scenes]) -> Scenes:
        return Scenes(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Scenes)})

    def captions(self) -> list[str]:
        return [caption_of(self, i) for i in range(len(self))]

    def triples(self) -> set[tuple[int, int, int]]:
        """Every (colour, shape, position) triple drawn in these scenes (main and second shapes)."""
        out = set(zip(self.colour.tolist(), self.shape.tolist(), self.position.tolist(), strict=True))
        has2 = self.colour2 >= 0
        out |= set(zip(self.colour2[has2].tolist(), self.shape2[has2].tolist(), self.position2[has2].tolist(),
                       strict=True))
        return out


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_of(scenes: Scenes, i: int) -> str:
    """The caption of scene ``i`` (every word is in ``services.tiny.tokenizers.WORDS``)."""
    text = f"a {SIZES[scenes.size[i]]} {COLOURS[scenes.colour[i]]} {SHAPES[scenes.shape[i]]} {PHRASES[scenes.position[i]]}"
    if scenes.colour2[i] >= 0:
        text += (f" and a small {COLOURS[scenes.colour2[i]]} {SHAPES[scenes.shape2[i]]} "
                 f"{PHRASES[scenes.position2[i]]}")
    bg = COLOURS[scenes.bg[i]]
    if scenes.bg2[i] >= 0:
        bg = f"{bg} and {COLOURS[scenes.bg2[i]]}"
    return f"{text}, on {_article(bg)} {bg} background"


def parse_caption(text: str) -> Scenes:
    """The scene a caption of this grammar describes (centred, nominal size); ValueError naming the bad part."""
    words = text.strip().rstrip(".").replace(",", " ,").split()

    def take(options: tuple[str, ...], what: str) -> int:
        if not words or words[0] not in options:
            raise ValueError(f"expected a {what} ({'/'.join(options)}) at {' '.join(words[:4])!r} in {text!r}")
        return options.index(words.pop(0))

    def expect(*tokens: str) -> None:
        for t in tokens:
            if not words or words.pop(0) != t:
                raise ValueError(f"expected {' '.join(tokens)!r} in {text!r}")

    def phrase() -> int:
        for i, p in enumerate(PHRASES):
            if words[:3] == p.split():
                del words[:3]
                return i
        raise ValueError(f"expected a position ({'/'.join(PHRASES)}) in {text!r}")

    row: dict[str, int] = {"colour2": -1, "shape2": -1, "position2": -1, "bg2": -1}
    expect("a")
    row["size"], row["colour"], row["shape"] = take(SIZES, "size"), take(COLOURS, "colour"), take(SHAPES, "shape")
    row["position"] = phrase()
    if words and words[0] == "and":
        expect("and", "a", "small")
        row["colour2"], row["shape2"] = take(COLOURS, "colour"), take(SHAPES, "shape")
        row["position2"] = phrase()
    expect(",", "on")
    if words and words[0] in ("a", "an"):
        words.pop(0)
    row["bg"] = take(COLOURS, "background colour")
    if words and words[0] == "and":
        words.pop(0)
        row["bg2"] = take(COLOURS, "background colour")
    expect("background")
    if words:
        raise ValueError(f"unexpected words {' '.join(words)!r} at the end of {text!r}")
    ints = {k: np.array([v], dtype=np.int64) for k, v in row.items()}
    zeros, ones = np.zeros(1, dtype=np.float32), np.ones(1, dtype=np.float32)
    return Scenes(**ints, dx=zeros, dy=zeros, scale=ones, dx2=zeros.copy(), dy2=zeros.copy(), scale2=ones.copy())


def _is_heldout(colour: np.ndarray, shape: np.ndarray, position: np.ndarray) -> np.ndarray:
    table = np.zeros((N_COLOURS, N_SHAPES, N_POSITIONS), dtype=bool)
    for c, s, p in HELDOUT_TRIPLES:
        table[c, s, p] = True
    valid = colour >= 0
    out = np.zeros(colour.shape, dtype=bool)
    out[valid] = table[colour[valid], shape[valid], position[valid]]
    return out


def sample_scenes(n: int, seed: int, split: Split = "train") -> Scenes:
    """``n`` random scenes, a pure function of ``seed``. ``split="train"`` never draws a held-out triple;
    ``split="all"`` draws from every combination (the evaluator's training data)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    i64 = np.int64

    def ints(high: int) -> np.ndarray:
        return rng.integers(0, high, n, dtype=i64)

    def unif(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, n).astype(np.float32)

    bg = ints(N_COLOURS)
    bg2 = np.where(rng.random(n) < P_TWO_TONE, (bg + 1 + ints(N_COLOURS - 1)) % N_COLOURS, -1)
    has2 = rng.random(n) < P_SECOND
    size = np.where(has2, 1, ints(N_SIZES))
    colour, shape, position = ints(N_COLOURS), ints(N_SHAPES), ints(N_POSITIONS)
    colour2, shape2 = np.where(has2, ints(N_COLOURS), -1), np.where(has2, ints(N_SHAPES), -1)
    position2 = np.where(has2, (position + 1 + ints(N_POSITIONS - 1)) % N_POSITIONS, -1)
    s = Scenes(colour=colour, shape=shape, size=size, position=position, dx=unif(-JITTER, JITTER),
               dy=unif(-JITTER, JITTER), scale=unif(0.92, 1.08), bg=bg, bg2=bg2, colour2=colour2, shape2=shape2,
               position2=position2, dx2=unif(-JITTER, JITTER), dy2=unif(-JITTER, JITTER), scale2=unif(0.92, 1.08))
    # Redraw what breaks a rule until nothing does: a shape coloured like the background, a held-out triple.
    for _ in range(1000):
        clash = (s.colour == s.bg) | (s.colour == s.bg2)
        clash2 = (s.colour2 >= 0) & ((s.colour2 == s.bg) | (s.colour2 == s.bg2))
        if split == "train":
            clash |= _is_heldout(s.colour, s.shape, s.position)
            clash2 |= _is_heldout(s.colour2, s.shape2, s.position2)
        if not clash.any() and not clash2.any():
            return s
        k, k2 = int(clash.sum()), int(clash2.sum())
        s.colour[clash] = rng.integers(0, N_COLOURS, k)
        s.shape[clash] = rng.integers(0, N_SHAPES, k)
        s.colour2[clash2] = rng.integers(0, N_COLOURS, k2)
        s.shape2[clash2] = rng.integers(0, N_SHAPES, k2)
    raise RuntimeError("scene sampling did not converge")  # unreachable with these vocabularies


def heldout_scenes() -> Scenes:
    """The 64 evaluation scenes: each held-out triple large and small, centred, on a plain background."""
    rows = []
    for c, s, p in HELDOUT_TRIPLES:
        others = [x for x in range(N_COLOURS) if x != c]
        for size, k in ((1, 0), (0, 4)):
            rows.append((c, s, size, p, others[(3 * s + p + k) % len(others)]))
    arr = np.array(rows, dtype=np.int64)
    n = len(arr)
    none = np.full(n, -1, dtype=np.int64)
    zeros, ones = np.zeros(n, dtype=np.float32), np.ones(n, dtype=np.float32)
    return Scenes(colour=arr[:, 0], shape=arr[:, 1], size=arr[:, 2], position=arr[:, 3], bg=arr[:, 4], bg2=none,
                  colour2=none.copy(), shape2=none.copy(), position2=none.copy(), dx=zeros, dy=zeros.copy(),
                  scale=ones, dx2=zeros.copy(), dy2=zeros.copy(), scale2=ones.copy())


def heldout_captions() -> list[str]:
    return heldout_scenes().captions()
