"""Deterministic seed derivation: independent random streams from one run seed."""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (device id, round, purpose...).

    Hashing (rather than ``seed + round``) keeps the streams of different purposes independent:
    the activation sampler of device 3 in round 7 never shares a stream with training.
    """
    text = repr((int(seed), *(str(k) for k in keys))).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)
