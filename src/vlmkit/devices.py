"""Where a model runs: the `--device` flag of every verb that runs a model, resolved in one place.

    device = resolve_device("auto")      # CUDA if present, else MPS (Apple GPUs), else the CPU
    device = resolve_device("cuda:1")    # that GPU, or DeviceError naming --device and what is available
    loaded = load_model("tiny-random", device=device)

Everything else follows the model: inputs are created on (or moved to) the device of its parameters
(decoding.model_device), KV caches and sampling generators on the device of the tensors they serve,
checkpoints load straight onto it. This module is the only place in src/ that names a device type.
"""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")  # what --device accepts, as --help lists it
DEVICE_HELP = ("where the model runs: auto (CUDA if present, else MPS, else the CPU; default), cpu, cuda, "
               "cuda:N (the N-th GPU) or mps (Apple GPUs)")


class DeviceError(ValueError):
    """A --device that is not a device name, or names a device this machine does not have."""


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The devices this machine offers, by the names --device takes: cpu, then cuda:0.. and mps."""
    return ["cpu", *(f"cuda:{i}" for i in range(_cuda_count())), *(["mps"] if _mps_available() else [])]


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The torch.device of a --device value (None is auto). auto: a CUDA device if there is one, else MPS,
    else the CPU. `cuda` (and auto's CUDA) is cuda:local_rank: process LOCAL_RANK's own GPU under torchrun,
    cuda:0 otherwise. Raises DeviceError for an unknown name or a device this machine lacks, saying which
    names are valid and which devices are available."""
    if isinstance(name, torch.device):
        name = str(name)
    text = "auto" if name is None else name.strip().lower()
    if text == "auto":
        text = "cuda" if _cuda_count() else "mps" if _mps_available() else "cpu"
    kind, sep, index = text.partition(":")
    valid = (kind in ("cpu", "mps") and not sep) or (kind == "cuda" and (not sep or index.isdigit()))
    if not valid:
        raise DeviceError(f"--device {name!r} is not a device: give one of {', '.join(DEVICE_CHOICES)} "
                          f"(available here: {', '.join(available_devices())})")
    if kind == "cuda":
        count = _cuda_count()
        number = int(index) if sep else local_rank
        if number >= count:
            what = "no CUDA device (torch.cuda.is_available() is False)" if count == 0 else \
                f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            raise DeviceError(f"--device {name}: this machine has {what}; available: "
                              f"{', '.join(available_devices())} (or --device auto)")
        return torch.device("cuda", number)
    if kind == "mps" and not _mps_available():
        raise DeviceError(f"--device mps: MPS (Apple GPU) is not available here; available: "
                          f"{', '.join(available_devices())} (or --device auto)")
    return torch.device(kind)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The type bf16 autocast runs in on device: bfloat16 where the device supports it (the CPU, CUDA with
    bf16 units, MPS), None where it does not (an older GPU); the caller says so instead of autocasting."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type in ("cpu", "mps") else None


def distributed_backend(device: torch.device) -> str:
    """The torch.distributed backend for a process group training on device: gloo for the CPU (and MPS, which
    has no collective backend: its tensors go through the host), gloo for host tensors and NCCL for CUDA
    tensors on a CUDA device."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def compiles_with_triton(device: torch.device) -> bool:
    """Whether torch.compile's inductor generates Triton kernels for device (CUDA GPUs), so Triton must be
    installed to compile there; the CPU's kernels are C++ and MPS's are Metal."""
    return device.type == "cuda"
