"""Exact sums of float32 vectors, whatever the order of the terms: the index's per-feature activation sums.

A float32 value is an integer multiple of 2^-149 (its smallest subnormal), m 2^(e-149) with a 24-bit mantissa m
and 0 <= e <= 253. The running sum of each feature is kept as that integer, in `LIMBS` int64 limbs of 32 bits
(limb j weighs 2^(32 j - 149)); every term is added exactly and the carries are propagated after each addition,
so the limbs are a unique representation of the exact sum. Sums split over processes and added together (in any
order) therefore give the same limbs as one pass over every term, and `to_float64` the same float64 bits.
"""
from __future__ import annotations

import numpy as np

LIMBS = 10  # terms reach limb 7 (2^253 2^24 < 2^(32*8)); limbs 8 and 9 take the carries
_LIMB_BITS = 32


def zeros(n: int) -> np.ndarray:
    """An empty sum of n features: limbs [n, LIMBS] int64."""
    return np.zeros((n, LIMBS), np.int64)


def normalise(limbs: np.ndarray) -> np.ndarray:
    """Carries propagated: every limb but the last in [0, 2^32) (in place; returns limbs)."""
    for j in range(LIMBS - 1):
        carry = limbs[:, j] >> _LIMB_BITS  # floor: a negative limb borrows from the next
        limbs[:, j] -= carry << _LIMB_BITS
        limbs[:, j + 1] += carry
    return limbs


def add(limbs: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """limbs [n, LIMBS] plus the finite float32 terms [n], exactly (in place; returns limbs)."""
    bits = np.ascontiguousarray(terms, np.float32).view(np.uint32).astype(np.int64)
    biased = (bits >> 23) & 0xFF
    mantissa = (bits & 0x7FFFFF) | np.where(biased > 0, 0x800000, 0)
    shift = np.maximum(biased - 1, 0)  # the term is mantissa 2^shift units of 2^-149
    signed = np.where(bits >> 31 == 1, -mantissa, mantissa) << (shift & 31)  # |.| < 2^55
    limbs[np.arange(len(limbs)), shift >> 5] += signed
    return normalise(limbs)


def to_float64(limbs: np.ndarray) -> np.ndarray:
    """The sums [n] as float64 (the same limbs give the same bits)."""
    negative = limbs[:, -1] < 0  # the lower limbs are in [0, 2^32): the last one carries the sign
    magnitude = normalise(np.where(negative[:, None], -limbs, limbs))
    out = np.zeros(len(limbs), np.float64)
    for j in reversed(range(LIMBS)):  # largest first, all of one sign: no cancellation
        out += np.ldexp(magnitude[:, j].astype(np.float64), _LIMB_BITS * j - 149)
    return np.where(negative, -out, out)
