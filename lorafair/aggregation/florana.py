"""FLoRA-NA (seed 002): the server estimates the pair (A_hat, B_hat) it sends so that B_hat A_hat is as close as
possible to the ideal update dW = sum p_k B_k A_k, at the communication cost of plain averaging.

Only the abstract is public. It fixes the goal (minimise the gap between sum B_u A_u and B_hat A_hat, from the
clients' factors, on the server, with no extra communication) but not the estimator. Our reading:

    minimise ||B_hat A_hat - dW||_F, starting from the averaged pair (A_bar, B_bar),
    by `sweeps` rounds of alternating least squares: first B given A, then A given B.

Why this reading:
- Each half-step is the exact least-squares solution for one factor with the other held fixed, so the gap never
  grows: the result is never worse than averaging, which is where it starts (FLoRA-NA's promise over FedIT).
- Starting from (A_bar, B_bar) keeps the factors continuous with what every client already holds, as LoRA-FAIR
  does and unlike FlexLoRA, whose SVD re-bases both factors every round. More sweeps move towards the
  Eckart-Young optimum (alternating least squares is subspace iteration on dW), so `sweeps` trades continuity for
  accuracy; one sweep is the default.
- Among the least-squares solutions we take the smallest change, B + (dW - B A) pinv(A) (and the same for A):
  with full-rank factors that is the unique minimiser; with a rank-deficient factor it keeps the directions the
  other factor cannot see instead of zeroing them, so no LoRA component dies.

Every step needs dW only through dW pinv(A) and pinv(B) dW, which the ideal update gives on either path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lorafair.aggregation import cost
from lorafair.aggregation.base import Aggregator, check_option, is_count
from lorafair.aggregation.updates import GroupResult, LayerGroup


@dataclass
class FLoRANA(Aggregator):
    sweeps: int = 1
    """Alternating least-squares sweeps (B then A) from the averaged pair; 0 returns the averages."""

    name: ClassVar[str] = "florana"
    display_name: ClassVar[str] = "FLoRA-NA"

    def __post_init__(self) -> None:
        check_option(self.name, "sweeps", self.sweeps, is_count(self.sweeps), "an integer >= 0")

    def ideal_use(self) -> cost.IdealUse:
        return cost.IdealUse(products=2 * self.sweeps + 1)

    def combine(self, group: LayerGroup) -> GroupResult:
        A, B = group.A_bar, group.B_bar
        for _ in range(self.sweeps):
            A_pinv = torch.linalg.pinv(A)
            B = B + group.ideal.times(A_pinv) - B @ (A @ A_pinv)
            B_pinv = torch.linalg.pinv(B)
            A = A + group.ideal.transposed_times(B_pinv.mT).mT - (B_pinv @ B) @ A
        return GroupResult(lora=(A, B), metrics={"cos": group.cosine_to_ideal(B, A)})
