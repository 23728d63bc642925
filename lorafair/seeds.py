"""Every random start of a run comes from a seed derived here, so a draw depends on what it is for and never on the
process, rank or moment it happens in."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a purpose and integers, e.g. ("client", seed, round, id); distinct tuples give unrelated
    random streams."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
