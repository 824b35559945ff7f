"""The kit's errors, and out of GPU memory turned into one that says what to change (its memory freed first).

Imports nothing from nbkit: every layer may raise these (sampling, training, exports).
"""

from __future__ import annotations

import contextlib
import gc
import traceback

import torch


class NotWritable(PermissionError):
    """A folder the run must write to cannot be written; the message says which and what to do."""


class DiskSpaceError(OSError):
    """Not enough free disk for what the run will write; the message has the sums and what to change."""


class ExportError(ValueError):
    """The model cannot be written in the asked format (a diffusers folder, LoRA, embedding, single file); the
    message says why and what to do instead. One class for every exporter: `except ExportError` catches all."""


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message names the settings that use less. GPU memory has been freed."""


# --- folders and disk -------------------------------------------------------------------------------------------

def is_oom(err: BaseException) -> bool:
    """torch's OutOfMemoryError, or a RuntimeError saying 'out of memory' (older torch, MPS, some kernels)."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, oom) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def release(err: BaseException | None = None) -> None:
    """Drop what a failed call's frames hold (activations, optimizer state), then free GPU memory.

    The tracebacks of `err` and of the exceptions chained to it are cleared and detached: a frame keeps its
    function and with it every closure variable, so clearing its locals alone would keep the training state
    alive as long as the notebook keeps the error. Re-raise `err` afterwards: its traceback starts anew there.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err.__traceback__ = None
        err = err.__cause__ or err.__context__
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


GENERATION_ADVICE = [
    "fewer images at once (batch_size=1 in nbkit.generate)",
    "a smaller image size, or load the pipeline in fp16 (torch_dtype=torch.float16)",
    "pipe.enable_attention_slicing() and pipe.enable_vae_slicing()",
    "during training: num_validation_images=1, or validation_steps=0",
]


@contextlib.contextmanager
def out_of_memory(what: str, advice: list[str]):
    """Turn an out-of-memory error inside the block into OutOfMemory naming `advice`, GPU memory freed."""
    try:
        yield
    except OutOfMemory:
        raise
    except RuntimeError as err:
        if not is_oom(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        release(err)
        raise OutOfMemory(
            f"Out of GPU memory in {what} ({first[:200]}).\nUse less memory with any of:\n  - " + "\n  - ".join(advice)
            + "\nThe memory of the failed step was freed: change a setting, re-run the model-loading cell (the "
            "model in memory may be part-trained), and run again."
        ) from None


# --- non-finite loss --------------------------------------------------------------------------------------------
