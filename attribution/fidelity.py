"""Prompt fidelity as a number: a small attribute classifier, trained on the toy world's own
images, reads the generated samples; we report, per attribute, how often the prompted value is
what the classifier sees, against chance (prompts are uniform over the common values, so chance
is 1 / number of values).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attribution.common.files import atomic_write_bytes
from attribution.common.seeds import seeded_generator
from attribution.config import ConfigError
from attribution.data import toy_world
from attribution.data.dataset import CaptionedImageSet
from attribution.data.images import save_grid


class AttributeClassifier(nn.Module):
    """CNN with one head per toy-world attribute; input float (B, 3, H, W) in [-1, 1]."""

    def __init__(self, image_size: int):
        super().__init__()
        self.attributes = list(toy_world.ATTRIBUTES)
        self.values = {a: toy_world.all_values(a) for a in self.attributes}
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * ((image_size + 3) // 4) ** 2, 128), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(128, len(v)) for a, v in self.values.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, list[str]]:
        logits = self.eval()(x)
        return {a: [self.values[a][j] for j in logits[a].argmax(1).tolist()] for a in logits}


def attribute_targets(clf: AttributeClassifier, attrs: list[dict]) -> dict[str, torch.Tensor]:
    return {a: torch.tensor([clf.values[a].index(d[a]) for d in attrs]) for a in clf.attributes}


def train_attribute_classifier(world: CaptionedImageSet, steps: int, batch_size: int,
                               seed: int) -> tuple[AttributeClassifier, dict[str, float]]:
    """Train on 90% of the world; return the classifier and its accuracy on the other 10%."""
    torch.manual_seed(seed)
    n = len(world)
    perm = torch.randperm(n, generator=seeded_generator(seed, 31))
    held, train = perm[: n // 10], perm[n // 10 :]
    x = world.all_images()
    y = attribute_targets(AttributeClassifier(world.manifest["image_size"]), world.attributes)
    clf = AttributeClassifier(world.manifest["image_size"])
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    g = seeded_generator(seed, 32)
    for _ in range(steps):
        idx = train[torch.randint(len(train), (batch_size,), generator=g)]
        out = clf.train()(x[idx])
        loss = sum(nn.functional.cross_entropy(out[a], y[a][idx]) for a in out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = clf.eval()(x[held])
    acc = {a: float((out[a].argmax(1) == y[a][held]).float().mean()) for a in out}
    return clf, acc


def prompt_fidelity(cfg, world_dir: Path, gen_dir: Path, out_dir: Path,
                    progress: bool = True) -> dict:
    """Sample ``fidelity.n_samples`` uniform prompts, classify them, write ``fidelity.json``."""
    from attribution.generator.queries import generate_prompted

    world = CaptionedImageSet(world_dir)
    fc = cfg.fidelity
    clf, real_acc = train_attribute_classifier(world, fc.classifier_steps,
                                               fc.classifier_batch_size, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 202])
    attrs = toy_world.sample_uniform_attributes(rng, fc.n_samples)
    _, _, images, _ = generate_prompted(cfg, gen_dir, attrs, 2_000_000, progress=progress)
    x = torch.from_numpy(images).float().movedim(-1, 1) / 127.5 - 1
    pred = clf.predict(x)
    result = {"n_samples": len(attrs), "attributes": {}}
    for a in clf.attributes:
        hits = [p == d[a] for p, d in zip(pred[a], attrs)]
        result["attributes"][a] = {
            "accuracy": float(np.mean(hits)),
            "chance": 1.0 / len(toy_world.ATTRIBUTES[a]),
            "classifier_accuracy_on_real": real_acc[a],
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "fidelity.json", json.dumps(result, indent=2).encode())
    save_grid(images[:64], out_dir / "fidelity_samples.png", ncol=16)
    return result


def format_fidelity(result: dict) -> str:
    lines = [f"{'attribute':<12}{'accuracy':>10}{'chance':>9}{'clf on real':>13}"]
    for a, r in result["attributes"].items():
        lines.append(f"{a:<12}{r['accuracy']:>10.3f}{r['chance']:>9.3f}"
                     f"{r['classifier_accuracy_on_real']:>13.3f}")
    return "\n".join(lines)


def run_fidelity(cfg, inputs, out: Path, progress: bool = True) -> dict:
    """Stage ``fidelity``: prompt fidelity of the generator (``inputs["generator"]``) on the toy
    world (``inputs["world"]``, whose ground-truth attributes it reads)."""
    if cfg.world.kind != "toy":
        raise ConfigError("prompt fidelity reads the toy world's ground-truth attributes; "
                          f"world.kind={cfg.world.kind} has none")
    res = prompt_fidelity(cfg, inputs["world"], inputs["generator"], out, progress)
    return {f"{a}_acc": r["accuracy"] for a, r in res["attributes"].items()}
