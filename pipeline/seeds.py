"""Where every seeded draw of the pipeline gets its seed: one mix of integers.

A draw is named by what it is for (a `Draw`) and the integers that tell its instances apart
(the run's seed, then an epoch, step, rank, restart, sample or layer). `mix` turns that tuple
into one 63-bit seed with SplitMix64's finaliser, applied after each integer: a stable hash
(Python's `hash` is salted per process), in which two draws collide only by a 2^-63 chance, not
by arithmetic as `seed * 1000 + restart` did once restarts reached 1000. The purpose goes
first, so two draws for different purposes never share a stream even with equal numbers.

Torch's and Lightning's own seeded machinery (the model's initial weights through
`seed_everything`, `DistributedSampler`'s epoch order) takes the run's seed as it is.
"""

from __future__ import annotations

from enum import IntEnum

import torch

_MASK64 = 0xFFFFFFFFFFFFFFFF


class Draw(IntEnum):
    """What a seeded draw is for; the first integer of every mix."""

    DATA_SPLIT = 1  # an image folder's test split and the victim pool (pipeline.data)
    VICTIM_ORDER = 2  # the order in which trials take their victims (pipeline.client)
    REPEATED_LABELS = 3  # the classes of a repeated-label batch
    CLIENT_DROPOUT = 4  # the client's dropout mask of one sample at one step and layer
    CLIENT_DP_NOISE = 5  # per-sample DP noise of one local step
    UPLOAD_NOISE = 6  # the original's clip-noise, added once to the client's upload
    POISSON_BATCHES = 7  # DP-SGD's Poisson-sampled batches of one epoch on one process
    TRAINING_DP_NOISE = 8  # DP-SGD's noise at one training step on one process
    TRAINING_CLIP_NOISE = 9  # the clip-noise scheme's noise at one training step, on every process
    ATTACK_START = 10  # the dummy batch a restart starts from
    ATTACK_DROPOUT = 11  # the attacker's own dropout (a train-mode model) in one restart
    LOSS_DROPOUT = 12  # the same, when a given batch's gradient loss is scored (MLCO)
    LABEL_PROBES = 13  # the attacker's noise inputs that estimate the model's softmax
    SURROGATE_BATCHES = 14  # the attacker's own batches it tunes on (pipeline.attack.tune)
    SURROGATE_CLIENT = 15  # the client it simulates on them (dropout, DP noise)
    TUNE_SAMPLER = 16  # the study's sampler before one trial
    NORMALISATION_SAMPLE = 17  # the training images a streamed folder's mean and std are estimated on
    CLIENT_BOTTLENECK = 18  # the client's PRECODE noise of one sample at one step
    TRAINING_BOTTLENECK = 19  # PRECODE's noise at one training step on one process


def mix(draw: Draw, *numbers: int) -> int:
    """One 63-bit seed from a purpose and integers (negative ones taken modulo 2^64)."""
    h = 0x9E3779B97F4A7C15
    for n in (int(draw), *numbers):
        h = (h ^ (n & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def generator(draw: Draw, *numbers: int) -> torch.Generator:
    """A CPU generator seeded with `mix(draw, *numbers)`."""
    return torch.Generator().manual_seed(mix(draw, *numbers))
