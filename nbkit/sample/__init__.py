"""Pictures from a model: fixed-seed generation and grids, same-seed comparisons, the scheduler x steps grid.

Modules: compare, sampling. Import them by name (`from nbkit.sample import compare`); this file imports
nothing, so importing one module never loads the others.
"""
