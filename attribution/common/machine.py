"""The machine line every benchmark and study table starts with."""

from __future__ import annotations

import os
import platform

import torch


def machine_line() -> str:
    return (f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
            f"{torch.get_num_threads()}, torch {torch.__version__}")
