"""Report: what a run leaves behind, built from the records the search hands it.

The best model and its card, lineage, plots, optuna-dashboard's view and experiment tracking.
Nothing here imports the search: it is given the archive, trials and settings.
"""
