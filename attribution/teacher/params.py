"""Which generator parameters are unlearned, and keeping/restoring θ0."""

from __future__ import annotations

import re

import torch
from torch import nn

# name -> regex on module names; the modules' weights (and biases) are the unlearned parameters.
GROUPS = {
    "cross_attn_kv": r"attn2\.to_[kv]$",  # the reference: cross-attention key/value projections
    "cross_attn": r"attn2\.(to_[qkv]|to_out\.0)$",
    "attn": r"attn[12]\.(to_[qkv]|to_out\.0)$",
    "all": r".*",
}


def select_modules(model: nn.Module, group: str) -> dict[str, nn.Module]:
    """Leaf modules with parameters whose names match the group (Linear for attention groups)."""
    if group not in GROUPS:
        raise ValueError(f"unknown parameter group {group!r}; choose from {list(GROUPS)}")
    pattern = re.compile(GROUPS[group])
    found = {}
    for name, mod in model.named_modules():
        has_own = any(True for _ in mod.parameters(recurse=False))
        if has_own and pattern.search(name) and (group == "all" or isinstance(mod, nn.Linear)):
            found[name] = mod
    if not found:
        raise ValueError(f"parameter group {group!r} matches no module of this generator")
    return found


def select_parameters(model: nn.Module, group: str) -> dict[str, nn.Parameter]:
    """Full parameter names -> parameters of the selected modules."""
    out = {}
    for mname, mod in select_modules(model, group).items():
        for pname, p in mod.named_parameters(recurse=False):
            out[f"{mname}.{pname}"] = p
    return out


class ParamSnapshot:
    """Copies of θ0 for a parameter subset; ``restore`` writes them back in place."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.saved = {k: p.detach().clone() for k, p in params.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for k, p in self.params.items():
            p.copy_(self.saved[k])
