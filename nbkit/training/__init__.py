"""The one training loop and what it needs: methods (which parameters train), the optimizer (AdamW, 8-bit, in
backward), batches, placement of the parts, checkpoints, guards, the manifest, the Accelerator, launching every
GPU, the presets table and the memory savers.

Modules: accel, batches, checkpoint, guards, launch, loop, manifest, methods, optim, placement, presets, savers.
Import them by name (`from nbkit.training import accel`); this file imports nothing, so importing one module never
loads the others.
"""
