"""The notebooks' helpers: nb.setup (session), plots, widgets, the course table, papermill sweeps.

Modules: course, plots, session, sweep, sweep_pick, sweep_results, sweep_spec, widgets. Import them by name
(`from nbkit.notebook import course`); this file imports nothing, so importing one module never loads the others.
"""
