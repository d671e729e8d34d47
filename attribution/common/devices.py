"""Device selection, written once: the config's ``device`` (auto | cpu | cuda) to torch, to
Lightning and to faiss.  ``cuda`` is a demand (an error where it cannot be met, before any
work); ``auto`` is the explicit fallback (a GPU when there is one, else the CPU)."""

from __future__ import annotations

import torch


class DeviceError(RuntimeError):
    """The configured device is not on this machine (or a library it needs is missing)."""


def check_device(device: str) -> None:
    """Refuse ``device=cuda`` on a machine where torch sees no CUDA GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device=cuda, but torch sees no CUDA GPU on this machine: use "
                          "device=auto to run on the CPU where there is none (or device=cpu)")


def check_device_counts(device: str, counts: dict[str, int]) -> None:
    """Refuse ``<stage>.devices`` (per node) above the GPUs this machine has, where the work
    goes on GPUs (``cuda``, or ``auto`` with a GPU); on the CPU several devices are processes."""
    if device == "cpu" or not torch.cuda.is_available():
        return
    have = torch.cuda.device_count()
    for key, n in counts.items():
        if n > have:
            raise DeviceError(f"{key}={n}, but this machine has {have} CUDA GPU(s): ask for at "
                              f"most {have} per node (several nodes: the *.num_nodes keys)")


def torch_device(device: str) -> str:
    """``"cuda"`` when asked for (or ``auto``) and a GPU exists, else ``"cpu"``."""
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def accelerator_for(device: str) -> str:
    """The Lightning accelerator name for the config's ``device`` (an explicit ``cuda`` stays
    ``gpu`` even without one, so Lightning says so instead of silently using the CPU)."""
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if device == "cuda" else "cpu"


def faiss_on_gpu(device: str) -> bool:
    """Whether the student's faiss index goes on the GPU: ``cuda`` demands it (faiss built
    with GPU support — the ``gpu`` extra — and a GPU; an error naming the fix otherwise),
    ``auto`` takes it when both are there, ``cpu`` never."""
    if device == "cpu" or not torch.cuda.is_available():
        check_device(device)
        return False
    import faiss

    ready = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if device == "cuda" and not ready:
        raise DeviceError("device=cuda: the student's index and search need faiss with GPU "
                          "support, which this install lacks: install the gpu extra "
                          "(pip install -e '.[gpu]' instead of '.[cpu]'), or use device=auto")
    return ready
