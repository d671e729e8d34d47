"""New concepts for the customization benchmark: shapes and styles the training set never shows.

A concept is a pure function of (benchmark seed, concept index):

- **object**: a new shape (a random star polygon: 4–7 points, random inner radius and rotation)
  drawn in the world's known colours, positions, sizes and backgrounds.  Prompts put the
  concept's word where the shape goes: "a large solid red zorvik at the center on a gray
  background".
- **style**: a new look (a fill pattern — checkers, dots, horizontal/vertical bands, a
  two-colour split — in a new two-colour palette) applied to the world's known shapes.  Prompts
  put the word in the colour slot (every caption template names the colour) and leave the
  texture out: "a large zorvik circle at the center on a gray background".

Each concept has a made-up word (letters drawn from the seed; never an English word of the
toy vocabulary) that stands in for Custom Diffusion's new token ``V*``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from attribution.data import toy_world

KINDS = ("object", "style")
PATTERNS = ("checker", "dots", "hbands", "vbands", "split")
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclass
class Concept:
    """One new concept.

    Attributes:
        index: its position in the benchmark (seeds everything about it).
        kind: "object" (a new shape) or "style" (a new pattern and palette).
        word: the made-up word prompts use for it.
        params: the shape's or the style's parameters (JSON-serializable).
        exemplars: attribute dicts of its exemplar images (known attributes only).
    """

    index: int
    kind: str
    word: str
    params: dict
    exemplars: list[dict[str, str]] = field(default_factory=list)


def make_word(rng: np.random.Generator, taken: set[str]) -> str:
    """A pronounceable made-up word of three syllables, not in ``taken``."""
    vocab = {w for t in toy_world.TEMPLATES for w in re.findall(r"[a-z]+", t)}
    vocab |= {v for vals in toy_world.ATTRIBUTES.values() for v in vals}
    while True:
        word = "".join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS))
                       for _ in range(3)) + rng.choice(list(_CONSONANTS))
        if word not in taken and word not in vocab:
            taken.add(word)
            return word


def make_concepts(n: int, n_exemplars: int, seed: int) -> list[Concept]:
    """``n`` concepts alternating object/style, each with ``n_exemplars`` exemplar layouts."""
    if not 1 <= n_exemplars <= 8:
        raise ValueError(f"n_exemplars must be in 1..8, got {n_exemplars}")
    taken: set[str] = set()
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 17, i])
        kind = KINDS[i % 2]
        if kind == "object":
            params = {"points": int(rng.integers(4, 8)), "inner": float(rng.uniform(0.3, 0.5)),
                      "rotation": float(rng.uniform(0, 2 * np.pi))}
        else:
            palette = rng.integers(0, 256, size=(2, 3))
            while np.abs(palette[0] - palette[1]).sum() < 200:  # two clearly different colours
                palette = rng.integers(0, 256, size=(2, 3))
            params = {"pattern": PATTERNS[int(rng.integers(len(PATTERNS)))],
                      "period": int(rng.integers(2, 5)), "palette": palette.tolist()}
        c = Concept(i, kind, make_word(rng, taken), params)
        c.exemplars = layouts(c, n_exemplars, rng)
        out.append(c)
    return out


def layouts(concept: Concept, n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """Attribute dicts of ``n`` images of the concept, uniform over the known values it keeps
    free (object: colour, position, size, background; style: shape, position, size, background).
    The texture of an object image is solid; a style decides its own texture and colour."""
    free = ["position", "size", "background"] + (["colour"] if concept.kind == "object"
                                                 else ["shape"])
    out = []
    for _ in range(n):
        a = {k: toy_world.ATTRIBUTES[k][int(rng.integers(len(toy_world.ATTRIBUTES[k])))]
             for k in free}
        if concept.kind == "object":
            a.update(shape=concept.word, texture="solid")
        else:  # the word takes the colour slot, which every caption template names
            a.update(texture="", colour=concept.word)
        out.append(a)
    return out


def prompt(attrs: dict[str, str]) -> str:
    """The world's full caption template (the query prompt), empty slots squeezed out."""
    return captions(attrs, [0])[0]


def captions(attrs: dict[str, str], templates: list[int]) -> list[str]:
    """The world's caption templates for one layout (a style's empty texture squeezed out)."""
    return [re.sub(r"\s+", " ", toy_world.caption(attrs, t)).strip() for t in templates]


def _star_mask(size: int, center: tuple[float, float], radius: float, points: int,
               inner: float, rotation: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    y = (yy + 0.5) / size - center[0]
    x = (xx + 0.5) / size - center[1]
    theta = np.arctan2(y, x) - rotation
    r = np.hypot(x, y)
    # star outline: radius alternates between 1 and `inner` every half-sector, linearly
    sector = (theta % (2 * np.pi / points)) / (2 * np.pi / points)  # 0..1
    edge = 1 - (1 - inner) * (1 - np.abs(2 * sector - 1))
    return r <= radius * edge


def _pattern(size: int, params: dict, supersample: int) -> np.ndarray:
    """Which palette colour (0/1) each pixel of a style takes: int (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size] // supersample
    p = params["period"]
    kind = params["pattern"]
    if kind == "checker":
        return ((xx // p + yy // p) % 2).astype(int)
    if kind == "dots":
        return (((xx % (2 * p)) < p) & ((yy % (2 * p)) < p)).astype(int)
    if kind == "hbands":
        return ((yy // p) % 2).astype(int)
    if kind == "vbands":
        return ((xx // p) % 2).astype(int)
    if kind == "split":
        return (xx >= yy).astype(int)
    raise ValueError(f"unknown pattern {kind!r}")


def render(concept: Concept, attrs: dict[str, str], image_size: int) -> np.ndarray:
    """One image of the concept with the given known attributes: uint8 (H, W, 3)."""
    ss = toy_world.SUPERSAMPLE
    big = image_size * ss
    canvas = np.empty((big, big, 3), dtype=np.float64)
    canvas[:] = toy_world.BACKGROUND_RGB[attrs["background"]]
    center, radius = toy_world.CENTERS[attrs["position"]], toy_world.RADIUS[attrs["size"]]
    if concept.kind == "object":
        p = concept.params
        mask = _star_mask(big, center, radius * 1.2, p["points"], p["inner"], p["rotation"])
        canvas[mask] = toy_world.RGB[attrs["colour"]]
    else:
        mask = toy_world.shape_mask(attrs["shape"], big, center, radius)
        palette = np.asarray(concept.params["palette"], dtype=np.float64)
        fill = palette[_pattern(big, concept.params, ss)]
        canvas[mask] = fill[mask]
    small = canvas.reshape(image_size, ss, image_size, ss, 3).mean(axis=(1, 3))
    return np.clip(np.round(small), 0, 255).astype(np.uint8)


def synthesis_prompts(concept: Concept, n: int, seed: int) -> list[dict[str, str]]:
    """Layouts of the ``n`` images a customized model synthesizes (fresh draws, not exemplars)."""
    return layouts(concept, n, np.random.default_rng([seed, 19, concept.index]))
