"""The embedded toy world: procedural captioned images with ground-truth attributes.

Every image is one shape on a background, described by six attributes (shape, colour, position,
size, texture, background).  Attribute values follow a Zipf-like distribution, so some values are
common and others rare; a few *planted* concepts (e.g. the shape ``cross``) appear in exactly
``count`` images and nowhere else, so attribution has known answers.  Generation is a pure
function of the seed: the same seed gives the same bytes.
"""

from __future__ import annotations

import numpy as np

# Common values first: with the Zipf skew the first value of each list is the most frequent.
ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "diamond", "ring"],
    "colour": ["red", "green", "blue", "yellow", "cyan", "magenta"],
    "position": ["center", "top left", "top right", "bottom left", "bottom right"],
    "size": ["large", "small"],
    "texture": ["solid", "striped"],
    "background": ["black", "gray", "navy"],
}
# Values that exist only as planted concepts (never drawn at random).
RARE_VALUES: dict[str, list[str]] = {"shape": ["cross", "heart"], "colour": ["pink", "orange"]}

RGB = {
    "red": (230, 30, 30), "green": (30, 200, 50), "blue": (40, 90, 255), "yellow": (240, 230, 40),
    "cyan": (40, 230, 230), "magenta": (220, 40, 220), "pink": (255, 160, 200),
    "orange": (255, 140, 0),
}
BACKGROUND_RGB = {"black": (0, 0, 0), "gray": (110, 110, 110), "navy": (10, 20, 80)}
CENTERS = {"center": (0.5, 0.5), "top left": (0.28, 0.28), "top right": (0.28, 0.72),
           "bottom left": (0.72, 0.28), "bottom right": (0.72, 0.72)}  # (row, col) fractions
RADIUS = {"large": 0.25, "small": 0.15}  # fraction of the image side

# Paraphrase templates; the first one names every attribute and is the query prompt template.
TEMPLATES = [
    "a {size} {texture} {colour} {shape} at the {position} on a {background} background",
    "{texture} {colour} {shape}, {size}, {position}, {background} background",
    "a picture of a {colour} {shape} in the {position}",
    "{background} background with a {size} {colour} {shape} at the {position}",
    "the {position} shows a {texture} {colour} {shape}",
    "a {colour} {shape} that is {size}, placed at the {position} over {background}",
]

SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges


def all_values(attribute: str) -> list[str]:
    return ATTRIBUTES[attribute] + RARE_VALUES.get(attribute, [])


def caption(attrs: dict[str, str], template: int = 0) -> str:
    return TEMPLATES[template].format(**attrs)


def shape_mask(shape: str, size: int, center: tuple[float, float], radius: float) -> np.ndarray:
    """Boolean (size, size) mask of a shape centred at ``center`` (fractions) with ``radius``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    y = (yy + 0.5) / size - center[0]
    x = (xx + 0.5) / size - center[1]
    r = radius
    if shape == "circle":
        return x**2 + y**2 <= r**2
    if shape == "ring":
        d2 = x**2 + y**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return (np.abs(x) <= 0.85 * r) & (np.abs(y) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1.15 * r
    if shape == "triangle":  # apex up
        return (y <= 0.8 * r) & (y >= -r) & (np.abs(x) <= (y + r) * 0.6)
    if shape == "cross":
        arm = 0.33 * r
        return ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    if shape == "heart":
        xs, ys = x / r, -y / r + 0.15
        return (xs**2 + ys**2 - 0.55) ** 3 - xs**2 * ys**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


def render(attrs: dict[str, str], image_size: int) -> np.ndarray:
    """Render one scene as uint8 (image_size, image_size, 3)."""
    big = image_size * SUPERSAMPLE
    canvas = np.empty((big, big, 3), dtype=np.float64)
    canvas[:] = BACKGROUND_RGB[attrs["background"]]
    mask = shape_mask(attrs["shape"], big, CENTERS[attrs["position"]], RADIUS[attrs["size"]])
    if attrs["texture"] == "striped":  # diagonal stripes, period 4 output pixels
        yy, xx = np.mgrid[0:big, 0:big]
        mask &= ((xx + yy) // (2 * SUPERSAMPLE)) % 2 == 0
    canvas[mask] = RGB[attrs["colour"]]
    small = canvas.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(small), 0, 255).astype(np.uint8)


def zipf_probs(n: int, skew: float) -> np.ndarray:
    p = (np.arange(n) + 1.0) ** -skew
    return p / p.sum()


def sample_attributes(rng: np.random.Generator, n: int, skew: float) -> list[dict[str, str]]:
    """Draw ``n`` attribute dicts from the world's (skewed) distribution; no rare values."""
    cols = {
        a: rng.choice(len(v), size=n, p=zipf_probs(len(v), skew)) for a, v in ATTRIBUTES.items()
    }
    return [{a: ATTRIBUTES[a][cols[a][i]] for a in ATTRIBUTES} for i in range(n)]


def sample_uniform_attributes(rng: np.random.Generator, n: int) -> list[dict[str, str]]:
    """Uniform over common values: for prompt-fidelity, where chance is then 1/len(values)."""
    return [{a: v[rng.integers(len(v))] for a, v in ATTRIBUTES.items()} for _ in range(n)]


def generate_world(
    n_items: int,
    image_size: int,
    captions_per_item: int,
    zipf: float,
    planted: list[dict],
    seed: int,
) -> tuple[np.ndarray, list[list[str]], list[dict[str, str]]]:
    """Generate the toy training set.

    Returns:
        images: uint8 (n_items, image_size, image_size, 3).
        captions: ``captions_per_item`` paraphrases per item.
        attributes: ground-truth attribute dict per item.
    """
    if captions_per_item > len(TEMPLATES):
        raise ValueError(f"captions_per_item must be <= {len(TEMPLATES)}")
    rng = np.random.default_rng(seed)
    attrs = sample_attributes(rng, n_items, zipf)
    taken = rng.permutation(n_items)
    cursor = 0
    for concept in planted:
        attribute, value, count = concept["attribute"], concept["value"], int(concept["count"])
        if attribute not in ATTRIBUTES or value not in all_values(attribute):
            raise ValueError(f"planted concept {attribute}={value!r} is not a known value")
        if value in ATTRIBUTES[attribute]:
            raise ValueError(f"planted value {value!r} is a common value; use one of {RARE_VALUES}")
        if cursor + count > n_items:
            raise ValueError("planted concepts need more items than the world has")
        for i in taken[cursor : cursor + count]:
            attrs[i][attribute] = value
        cursor += count
    images = np.stack([render(a, image_size) for a in attrs])
    caps = []
    for a in attrs:
        order = rng.permutation(len(TEMPLATES))[:captions_per_item]
        caps.append([caption(a, int(t)) for t in order])
    return images, caps, attrs
