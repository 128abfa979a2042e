"""Gradient-inversion research pipeline: the library behind the DVC stages.

Nothing here knows about DVC or MLflow run ids; importing it does no I/O.
"""
