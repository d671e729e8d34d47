"""Device selection, written once: the config's ``device`` (auto | cpu | cuda) to torch and to
Lightning."""

from __future__ import annotations

import torch


def torch_device(device: str) -> str:
    """``"cuda"`` when asked for (or ``auto``) and a GPU exists, else ``"cpu"``."""
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def accelerator_for(device: str) -> str:
    """The Lightning accelerator name for the config's ``device`` (an explicit ``cuda`` stays
    ``gpu`` even without one, so Lightning says so instead of silently using the CPU)."""
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if device == "cuda" else "cpu"
