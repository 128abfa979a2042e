"""Thin command-line stages, one per DVC stage: `python -m stages.<name>`."""
