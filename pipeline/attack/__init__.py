"""The gradient inversion attack: label recovery and the image optimisation."""

from pipeline.attack.invert import Reconstruction, invert
from pipeline.attack.labels import LABEL_METHODS, recover_labels

__all__ = ["Reconstruction", "invert", "LABEL_METHODS", "recover_labels"]
