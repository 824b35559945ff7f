"""The memory savers: the one list of settings that lower a training run's GPU memory, cheapest first.

`nbkit.memory.planner` plans each (`advise`), `nbkit.memory.tuning.tune` applies the automatic ones until a run fits,
and `nbkit.training.guards.training_advice` names them after an out-of-memory error. This module imports nothing from
nbkit but the config.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbkit.config import TrainConfig


@dataclass
class Change:
    settings: dict  # TrainConfig fields to set
    why: str
    automatic: bool = True  # False: only suggested (it changes what is trained or needs another setup)

    def __str__(self) -> str:
        """'field=value, ...: why': a line of advice."""
        return ", ".join(f"{k}={v!r}" for k, v in self.settings.items()) + f": {self.why}"


def remedies(cfg: TrainConfig) -> list[Change]:
    """Memory savers not yet in `cfg`, cheapest first (in quality and speed)."""
    out = []
    if cfg.use_ema:
        out.append(Change({"use_ema": False}, "no EMA, one fp32 copy of the trained weights less (the run then saves "
                                              "the raw weights)", automatic=False))
    if cfg.mixed_precision == "no":
        out.append(Change({"mixed_precision": "auto"}, "mixed precision, fp16/bf16 activations (trainable weights "
                                                        "stay fp32)", automatic=False))
    if not cfg.use_8bit_adam and not cfg.deepspeed_config:
        out.append(Change({"use_8bit_adam": True}, "8-bit AdamW, optimizer state 4x smaller, same results (needs "
                                                    "bitsandbytes)"))
    if not cfg.gradient_checkpointing:
        out.append(Change({"gradient_checkpointing": True}, "gradient checkpointing, activations recomputed in "
                                                            "backward (~20-30% slower)"))
    if not cfg.cache_latents:
        out.append(Change({"cache_latents": True}, "cached latents, the images encoded once and the VAE off the GPU"))
    if cfg.train_batch_size > 1 and not cfg.optimizer_in_backward:
        out.append(Change({"train_batch_size": 1, "gradient_accumulation_steps":
                           cfg.gradient_accumulation_steps * cfg.train_batch_size},
                          f"batch {cfg.train_batch_size} -> 1 x {cfg.train_batch_size} accumulation steps "
                          "(same effective batch)"))
    if (cfg.method == "dreambooth" and not cfg.optimizer_in_backward and not cfg.deepspeed_config
            and cfg.gradient_accumulation_steps == 1):
        out.append(Change({"optimizer_in_backward": True, "max_grad_norm": 0.0},
                          "optimizer in backward, no full gradient buffer (no clipping, no accumulation)"))
    if cfg.method == "dreambooth" and not cfg.train_text_encoder:
        out.append(Change({"deepspeed_config": "8gb-deepspeed preset"},
                          "DeepSpeed ZeRO-2 with CPU offload (preset '8gb-deepspeed'; needs ~25 GB of host RAM "
                          "and `pip install deepspeed`)", automatic=False))
    if cfg.train_text_encoder:
        out.append(Change({"train_text_encoder": False}, "the UNet only (no text encoder weights, gradients and "
                                                         "optimizer state to hold)", automatic=False))
    if cfg.method == "dreambooth":
        out.append(Change({"method": "lora"}, "LoRA instead of full DreamBooth (a few MB of trained weights)",
                          automatic=False))
    if cfg.resolution > 384:
        out.append(Change({"resolution": cfg.resolution * 3 // 4 // 8 * 8},
                          "a lower training resolution (activations shrink with the pixels)", automatic=False))
    return out
