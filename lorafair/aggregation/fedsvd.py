"""FedSVD (Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA", arXiv
2505.12805): A is frozen on the clients, which train and upload B only; the server averages B by sample count,
B_bar = sum p_k B_k (every client started from the same B, so this adds the mean change to it), and every
`svd_period` rounds after the first `svd_warmup` it refactors the unscaled product B_bar A by SVD:

    B_bar A = U S V^T    (rank r)     A' = V_r^T (orthonormal rows),   B' = U_r S_r,   so B' A' = B_bar A

Clients then download both factors and train B from (A', B') next round. A round that does not refactor sends B
down only, as FFA-LoRA does; averaging B with one shared A is exact, sum p_k B_k A = B_bar A, and so is the refactor.

The SVD never forms the out x in product: QR of B_bar and of A^T and an SVD of the r x r core
(`lowrank.truncated_svd`).

Mixed ranks: as FFA-LoRA, a rank-r client trains with the leading r rows of the shared A and its B is read in the
server's scaling (`ranks`), so B_bar A stays exact; after a refactor a rank-r client starts from the leading r
singular components, the best rank-r approximation of the global update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorafair.aggregation import lowrank
from lorafair.aggregation.base import Aggregator, check_option, is_count
from lorafair.aggregation.rules import ClientRule
from lorafair.aggregation.updates import GroupResult, LayerGroup


@dataclass
class FedSVD(Aggregator):
    svd_period: int = 1
    """Refactor B A by SVD every this many rounds, once svd_warmup rounds have passed (1: every round)."""
    svd_warmup: int = 0
    """Rounds of plain B averaging with the frozen A before the first refactor."""

    name: ClassVar[str] = "fedsvd"
    display_name: ClassVar[str] = "FedSVD"
    needs: ClassVar[str] = "averages"
    sums_only: ClassVar[bool] = True
    global_model: ClassVar[str] = ("the starting backbone (with the averaged head) in base/ and, in the adapter, the "
                                   "server's A (orthonormal rows after a refactor) and B; the frozen weights never "
                                   "change.")

    def __post_init__(self) -> None:
        check_option(self.name, "svd_period", self.svd_period, is_count(self.svd_period) and self.svd_period >= 1,
                     "an integer >= 1")
        check_option(self.name, "svd_warmup", self.svd_warmup, is_count(self.svd_warmup), "an integer >= 0")

    def client_rule(self, round_index: int) -> ClientRule:
        """Every round: train and upload B only; A is the server's, frozen."""
        return ClientRule(trains="B", sends="B")

    def refactors(self, round_index: int) -> bool:
        """Whether the server refactors B A after round `round_index`: rounds svd_warmup + svd_period,
        svd_warmup + 2 svd_period, ..."""
        return round_index > self.svd_warmup and (round_index - self.svd_warmup) % self.svd_period == 0

    def downloads(self, round_index: int) -> str:
        """Both factors after a refactor, else B only."""
        return "AB" if self.refactors(round_index) else "B"

    def combine(self, group: LayerGroup) -> GroupResult:
        if not self.refactors(group.round_index):
            return GroupResult(lora=(group.A_bar, group.B_bar))
        U, S, Vh = lowrank.truncated_svd(group.B_bar, group.A_bar, group.rank)
        return GroupResult(lora=(Vh, U * S.unsqueeze(-2)))
