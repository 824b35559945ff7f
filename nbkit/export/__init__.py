"""Taking the model home: the formats (diffusers, LoRA diffusers/kohya, TI diffusers/A1111), the original-SD single
file, take_home (every file reloaded and checked), the Hub.

Modules: formats, hub, singlefile, takehome. Import them by name (`from nbkit.export import formats`); this file imports
nothing, so importing one module never loads the others.
"""
