"""Thin entry script: the main job on the embedded toy world (same as `attribution run`).

    python experiments/toy.py [key=value ...]
"""

import sys
from pathlib import Path

from attribution.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "toy.yaml"

if __name__ == "__main__":
    sys.exit(main(["run", str(CONFIG), *sys.argv[1:]]))
