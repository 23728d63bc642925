"""Seeds derived for every random start of a run."""

from __future__ import annotations

from lorafair.seeds import derive_seed


def test_derived_seeds_differ_by_every_part():
    seeds = {derive_seed("client", s, t, c) for s in range(3) for t in range(3) for c in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed("client", 0, 1, 2) == derive_seed("client", 0, 1, 2) != derive_seed("sample", 0, 1, 2)
