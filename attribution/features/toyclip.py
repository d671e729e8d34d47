"""A small CLIP (open_clip's own model class) trained on the toy world's image–caption pairs.

It gives the toy world image and text feature spaces that carry real information offline,
in the same code path as a pretrained open_clip model (``open_clip.model.CLIP``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from attribution.common.files import atomic_write_bytes
from attribution.common.seeds import seeded_generator
from attribution.data.dataset import CaptionedImageSet


def toyclip_config(image_size: int, width: int, embed_dim: int) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": 4, "width": width, "layers": 3,
                       "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": width, "heads": 2,
                     "layers": 2},
    }


def build_toyclip(config: dict):
    import open_clip

    return open_clip.model.CLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"])


def tokenizer(context_length: int = 32):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def train_toyclip(world: CaptionedImageSet, out: Path, steps: int, batch_size: int, lr: float,
                  width: int, embed_dim: int, seed: int, progress: bool = True) -> dict:
    """Contrastive training on (image, random caption of it); writes toyclip.pt + toyclip.json."""
    from open_clip.loss import ClipLoss

    torch.manual_seed(seed)
    config = toyclip_config(world.manifest["image_size"], width, embed_dim)
    model = build_toyclip(config)
    tok = tokenizer()
    images = world.all_images()
    caps = world.captions
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    loss_fn = ClipLoss()
    g = seeded_generator(seed, 51)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="toy CLIP", disable=not progress, leave=False):
        idx = torch.randperm(len(images), generator=g)[:batch_size]
        pick = torch.randint(len(caps[0]), (len(idx),), generator=g)
        text = tok([caps[i][c] for i, c in zip(idx.tolist(), pick.tolist())])
        img_f = model.encode_image(images[idx], normalize=True)
        txt_f = model.encode_text(text, normalize=True)
        loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "toyclip.pt")
    atomic_write_bytes(out / "toyclip.json", json.dumps(config, indent=2).encode())
    return {"final_loss": float(loss.detach()), "steps": steps}


def load_toyclip(folder: Path):
    from attribution.common.files import DataFileError, load_weights, read_json

    folder = Path(folder)
    hint = "rerun `attribution toyclip CONFIG` (delete the folder first)"
    config = read_json(folder / "toyclip.json", "toy CLIP config", hint)
    state = load_weights(folder / "toyclip.pt", "toy CLIP weights", hint)
    try:
        model = build_toyclip(config)
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as err:
        raise DataFileError(f"toy CLIP files in {folder} do not fit together ({err}). "
                            f"To rebuild them, {hint}.") from err
    return model.eval().requires_grad_(False)
