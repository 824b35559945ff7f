"""What training costs in GPU memory: the budget, the planner and its activation model, measured allocations, a run
tuned to a GPU (tune, preview).

Modules: actmodel, budget, memtrace, planner, tuning. Import them by name (`from nbkit.memory import actmodel`); this
file imports nothing, so importing one module never loads the others.
"""
