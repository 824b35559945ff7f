"""Where are we running, on what, and which defaults fit it.

Colab, Kaggle or a local machine; the GPU, its memory and whether it does bf16 (T4 and P100 don't); whether a
model hub can be reached. The notebooks print `describe()` first, so a student sees at once what they got.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the real default where a GPU and the hub are there


@dataclass(frozen=True)
class Runtime:
    platform: str  # "colab" | "kaggle" | "local"
    device: str  # "cuda" | "mps" | "cpu"
    gpu_name: str | None
    gpu_count: int
    gpu_memory_gb: float  # of the first GPU; 0 without one
    bf16: bool  # the GPU computes in bf16 (Ampere and newer)

    def describe(self) -> str:
        if self.device == "cuda":
            gpus = f"{self.gpu_count}x {self.gpu_name}, {self.gpu_memory_gb:.1f} GB each, {'bf16' if self.bf16 else 'fp16 only'}"
        else:
            gpus = f"no GPU ({self.device})"
        return f"{self.platform}: {gpus}"

    def default_precision(self) -> str:
        """Mixed precision to use when the setting is 'auto'."""
        if self.device != "cuda":
            return "no"
        return "bf16" if self.bf16 else "fp16"


def platform() -> str:
    if "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ:
        return "colab"
    if "KAGGLE_KERNEL_RUN_TYPE" in os.environ:
        return "kaggle"
    return "local"


def detect() -> Runtime:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Runtime(platform(), "cuda", props.name, torch.cuda.device_count(), props.total_memory / 2**30,
                       torch.cuda.is_bf16_supported())
    device = "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    return Runtime(platform(), device, None, 0, 0.0, False)


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face Hub answers (and HF_HUB_OFFLINE is not set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def choose_model(requested: str = "auto", rt: Runtime | None = None) -> tuple[str, str]:
    """Resolve MODEL='auto': SD 1.5 on a GPU with the hub, the offline model otherwise. Returns (model, why)."""
    if requested != "auto":
        return requested, f"using {requested!r} as asked"
    rt = rt or detect()
    if rt.device != "cuda":
        return "offline", ("no GPU here, so this run uses the kit's small OFFLINE model (64 px, learns in minutes "
                           "on a CPU). Its pictures are toy shapes, not photos: the steps are the same as with SD 1.5.")
    if not hub_reachable():
        return "offline", ("the model hub cannot be reached, so this run uses the kit's small OFFLINE model. "
                           f"Connect to the internet (or set MODEL to a local folder) to use {SD15}.")
    return SD15, f"GPU and hub available: using {SD15}"


def memory_settings(rt: Runtime, train_text_encoder: bool = False, with_prior_preservation: bool = False) -> dict:
    """TrainConfig memory settings that fit the detected GPU (a 16 GB T4/P100 is the design point).

    Training the text encoder adds its weights, gradients, optimizer state and activations; prior preservation
    doubles the images per step (and so the activations). Either one turns gradient checkpointing on below 30 GB.
    """
    if rt.device != "cuda":
        return dict(mixed_precision="no", use_8bit_adam=False, gradient_checkpointing=False)
    gb = rt.gpu_memory_gb
    return dict(
        mixed_precision="auto",  # fp16 on T4/P100, bf16 on Ampere+; trainable weights stay fp32
        use_8bit_adam=gb < 30,  # 8-bit AdamW: optimizer state ~4x smaller
        gradient_checkpointing=gb < 12 or ((train_text_encoder or with_prior_preservation) and gb < 30),  # recompute
    )
