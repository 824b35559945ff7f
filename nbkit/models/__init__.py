"""The model: its parts and their loading (hub id, folder or the offline model), pipelines, schedulers by name,
SD 1.5's architecture from its configs, the bundled offline model, SDXL's parts.

Modules: base, offline, parts, schedulers, sd15, sdxl. Import them by name (`from nbkit.models import offline`);
this file imports nothing, so importing one module never loads the others.
"""
