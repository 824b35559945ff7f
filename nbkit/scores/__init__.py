"""How good a run is: CLIP-I/DINO/CLIP-T or the toy judge, scores while training, the best model, the overfit warning.

Modules: evaluate, tracking. Import them by name (`from nbkit.scores import evaluate`); this file imports
nothing, so importing one module never loads the others.
"""
