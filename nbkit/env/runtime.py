"""Where are we running, on what, and which defaults fit it.

Colab, Kaggle or a local machine; the GPU, its memory and whether it does bf16 (T4 and P100 don't); whether a
model hub can be reached. The notebooks print `describe()` first, so a student sees at once what they got.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
from dataclasses import dataclass

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the real default where a GPU and the hub are there
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"  # SDXL notebooks' real default (family="sdxl")
TINY_SDXL = "tiny-sdxl"  # their offline stand-in (nbkit.models.sdxl.TINY_SDXL): SDXL's classes, random weights
# the model families a notebook can ask for: (real model, offline stand-in) - MODEL="auto" picks one of them
FAMILIES = {"sd": (SD15, "offline"), "sdxl": (SDXL_BASE, TINY_SDXL)}
# what choose_model says of the tiny SDXL when it picks it
_TINY_SDXL_IS = ("It has SDXL's classes (two text encoders, the size conditioning, SDXL's pipeline) with SEEDED "
                 "RANDOM weights, NOT pretrained: its pictures are noise. It shows how SDXL trains, what it costs and "
                 "how its LoRA files are written and loaded back, not what SDXL learns.")
# Tests only: with this set to 1, detect() answers T4_REHEARSAL and the training loop takes a T4's code path on
# the CPU (fp16 frozen weights, fp16 autocast, a real GradScaler, 8-bit AdamW). Never for users: it is slow.
REHEARSAL_ENV = "NBKIT_T4_REHEARSAL"


@dataclass(frozen=True)
class Runtime:
    platform: str  # "colab" | "kaggle" | "local"
    device: str  # "cuda" | "mps" | "cpu"
    gpu_name: str | None
    gpu_count: int
    gpu_memory_gb: float  # of the first GPU; 0 without one
    bf16: bool  # the GPU computes in bf16 (Ampere and newer)
    rehearsal: bool = False  # a T4's code path taken on the CPU (tests; see REHEARSAL_ENV)

    @property
    def gpu_path(self) -> bool:
        """The GPU's code path is taken: on a CUDA GPU, or rehearsed on the CPU."""
        return self.device == "cuda" or self.rehearsal

    def describe(self) -> str:
        if self.device == "cuda":
            gpus = (f"{self.gpu_count}x {self.gpu_name}, {self.gpu_memory_gb:.1f} GB each, "
                    f"{'bf16' if self.bf16 else 'fp16 only'}")
        else:
            gpus = f"no GPU ({self.device})"
        if self.rehearsal:
            gpus = f"{self.gpu_name}: a T4's fp16 code path on the CPU, for tests"
        return f"{self.platform}: {gpus}"

    def default_precision(self) -> str:
        """Mixed precision to use when the setting is 'auto' (resolve_precision's rule)."""
        return resolve_precision("auto", self)


def resolve_precision(requested: str, rt: Runtime, warn: bool = True) -> str:
    """The mixed precision a run on `rt` uses when `requested` ('auto', 'no', 'fp16', 'bf16') is asked for: the one
    rule of the training loop, the planner and the presets.

    'auto': bf16 on a GPU that computes in it, fp16 on other GPUs (and in the T4 rehearsal: `rt.gpu_path`),
    'no' (fp32) on a CPU or MPS. bf16 asked on a GPU without it becomes fp16, fp16 asked without a GPU path
    becomes 'no'; each with a warning unless `warn` is False (plans and descriptions, not runs).
    """
    p = requested
    if p == "auto":
        p = ("bf16" if rt.bf16 else "fp16") if rt.gpu_path else "no"
    if p == "bf16" and rt.gpu_path and not rt.bf16:
        if warn:
            warnings.warn(f"{rt.gpu_name} has no bf16: using fp16 instead.", stacklevel=2)
        p = "fp16"
    if p == "fp16" and not rt.gpu_path:
        if warn:
            warnings.warn("fp16 mixed precision needs a CUDA GPU: training in fp32 on this device.", stacklevel=2)
        p = "no"
    return p


# Well-known GPUs, as torch reports them (GiB; bf16 from Ampere on): for planning a run you are not on yet
# (tuning.preview), and the T4 that advice and the rehearsal mean.
GPUS = {
    "T4": Runtime("colab", "cuda", "Tesla T4", 1, 14.75, False),
    "P100": Runtime("kaggle", "cuda", "Tesla P100-PCIE-16GB", 1, 15.89, False),
    "2xT4": Runtime("kaggle", "cuda", "Tesla T4", 2, 14.75, False),
    "L4": Runtime("colab", "cuda", "NVIDIA L4", 1, 22.03, True),
    "A100-40GB": Runtime("colab", "cuda", "NVIDIA A100-SXM4-40GB", 1, 39.39, True),
    "RTX3060-12GB": Runtime("local", "cuda", "NVIDIA GeForce RTX 3060", 1, 11.76, True),
    "RTX3070-8GB": Runtime("local", "cuda", "NVIDIA GeForce RTX 3070", 1, 7.79, True),
}

# A T4 as the training loop sees it in the rehearsal: same precision decisions, but the tensors stay on the CPU.
T4_REHEARSAL = Runtime("local", "cpu", "Tesla T4 (rehearsal)", 1, GPUS["T4"].gpu_memory_gb, False, rehearsal=True)


def platform() -> str:
    if "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ:
        return "colab"
    if "KAGGLE_KERNEL_RUN_TYPE" in os.environ:
        return "kaggle"
    return "local"


def detect() -> Runtime:
    """The runtime here. Does not initialise CUDA when it can avoid it (nvidia-smi answers).

    bf16 is decided by compute capability >= 8.0 (Ampere on), never by `torch.cuda.is_bf16_supported()`: with
    its default `including_emulation=True` that answers True on a T4 (sm75) once CUDA is initialised, and a T4
    would then train in bf16 without a GradScaler, lose the memory-efficient attention kernel and run slowly.
    """
    import torch

    if os.environ.get(REHEARSAL_ENV, "0") not in ("0", ""):
        return T4_REHEARSAL
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() without creating a context
    if torch.cuda.is_available():
        gpu = None if torch.cuda.is_initialized() else _nvidia_smi()
        if gpu is None:
            props = torch.cuda.get_device_properties(0)
            gpu = (props.name, props.total_memory / 2**30, bf16_capable(props.major, props.minor))
        return Runtime(platform(), "cuda", gpu[0], torch.cuda.device_count(), gpu[1], gpu[2])
    device = "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    return Runtime(platform(), device, None, 0, 0.0, False)


def bf16_capable(major: int, minor: int = 0) -> bool:
    """bf16 compute from Ampere (compute capability 8.0) on; a T4 is 7.5, a P100 6.0."""
    return (major, minor) >= (8, 0)


def _nvidia_smi() -> tuple[str, float, bool] | None:
    """(name, GiB, bf16) of the first GPU from nvidia-smi, or None when it cannot tell."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,compute_cap",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()[0]
        name, mib, cap = (x.strip() for x in out.split(","))
        major, _, minor = cap.partition(".")
        return name, float(mib) / 1024, bf16_capable(int(major), int(minor or 0))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face Hub answers (and HF_HUB_OFFLINE is not set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def choose_model(requested: str = "auto", rt: Runtime | None = None, family: str = "sd") -> tuple[str, str]:
    """Resolve MODEL='auto' for a notebook of `family` (FAMILIES): "sd", SD 1.5 on a GPU with the hub and the
    offline toy model otherwise; "sdxl", SDXL base 1.0 on a GPU with the hub and the tiny SDXL otherwise (in an
    SDXL notebook "offline" means the tiny SDXL too). Returns (model, why)."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: choose one of {', '.join(FAMILIES)}.")
    real, stand_in = FAMILIES[family]
    if family == "sdxl" and requested == "offline":
        return stand_in, ("MODEL = 'offline' in an SDXL notebook: the kit's tiny OFFLINE model of SDXL "
                          f"({TINY_SDXL}). {_TINY_SDXL_IS}")
    if requested != "auto":
        return requested, f"using {requested!r} as asked"
    rt = rt or detect()
    small = {"sd": ("the kit's small OFFLINE model (64 px, learns in minutes on a CPU). Its pictures are toy "
                    "shapes, not photos: the steps are the same as with SD 1.5."),
             "sdxl": f"the kit's tiny OFFLINE model of SDXL ({TINY_SDXL}, 64 px). {_TINY_SDXL_IS}"}[family]
    if rt.device != "cuda":
        return stand_in, f"no GPU here, so this run uses {small}"
    if not hub_reachable():
        return stand_in, (f"the model hub cannot be reached, so this run uses {small} Connect to the internet (or "
                          f"set MODEL to a local folder) to use {real}.")
    return real, f"GPU and hub available: using {real}"

