"""Which differences between methods are real: paired 95% intervals of a method's score minus a baseline's.

Methods of one comparison share their seeds (data, partition, starting weights) and their test items, so the
differences are paired. With two or more seeds, the interval is Student's t on the per-seed differences of the
average score; with one seed, a paired bootstrap over the test items (resampled within each domain, the average
over domains recomputed), which says how much the test sample alone could move the difference.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A difference (in the unit of its inputs) with its confidence interval."""

    difference: float
    low: float
    high: float
    pairs: int
    """Seeds paired (t), or test items resampled (bootstrap)."""
    how: str
    """"t" or "bootstrap"."""

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_t_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of paired differences with a Student t interval (n - 1 degrees of freedom); needs two or more."""
    if len(differences) < 2:
        raise ValueError(f"a t interval needs two or more paired differences, got {len(differences)}")
    mean = statistics.fmean(differences)
    half = stats.t.ppf(0.5 + confidence / 2, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(
        len(differences))
    return Interval(mean, mean - half, mean + half, len(differences), "t")


def paired_bootstrap_interval(scores: Sequence[tuple[torch.Tensor, torch.Tensor]], confidence: float = CONFIDENCE,
                              samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Interval:
    """Difference of the average over domains of the mean item score (method minus baseline), with a percentile
    bootstrap interval: each resample draws every domain's items with replacement, the same items for both.

    `scores`: per domain, (method's item scores, baseline's item scores) over the same items in the same order."""
    generator = torch.Generator().manual_seed(seed)
    totals = torch.zeros(samples, dtype=torch.float64)
    difference = 0.0
    for method, baseline in scores:
        if method.shape != baseline.shape or method.ndim != 1 or len(method) == 0:
            raise ValueError(f"paired item scores must be two equal non-empty vectors, got {tuple(method.shape)} "
                             f"and {tuple(baseline.shape)}")
        delta = (method - baseline).to(torch.float64)
        difference += delta.mean().item()
        for chunk in torch.arange(samples).split(max(1, 2**22 // len(delta))):  # bounded memory
            draws = torch.randint(len(delta), (len(chunk), len(delta)), generator=generator)
            totals[chunk] += delta[draws].mean(dim=1)
    count = len(scores)
    low, high = torch.quantile(totals / count, torch.tensor([0.5 - confidence / 2, 0.5 + confidence / 2],
                                                            dtype=torch.float64)).tolist()
    return Interval(difference / count, low, high, sum(len(method) for method, _ in scores), "bootstrap")
