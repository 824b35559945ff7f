"""The toy world: scenes, subjects and captions, its judge, pretraining the toy model, the offline spec.

Modules: judge, pretrain, spec, world. Import them by name (`from nbkit.toy import judge`); this file imports
nothing, so importing one module never loads the others.
"""
