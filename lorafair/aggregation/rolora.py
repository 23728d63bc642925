"""RoLoRA (Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA", arXiv
2502.01755): the factors alternate by round. In odd rounds clients train and upload A only, B frozen at the shared
value; in even rounds B only, A frozen. The server averages the factor that was sent and keeps the other:

    odd:  A' = sum p_k A_k,  B' = B    and  sum p_k B A_k = B A'  exactly
    even: B' = sum p_k B_k,  A' = A    and  sum p_k B_k A = B' A  exactly

so the averaged pair is the ideal update with no aggregation error, and each client uploads (and downloads) one
factor a round. Every client starts a round from the server's pair (`Aggregator.refusal` checks that the frozen
factor came back unchanged).

Clients of different ranks are refused: the average of zero-padded lower-rank factors is no longer exact.
"""

from __future__ import annotations

from typing import ClassVar

from lorafair.aggregation.base import Aggregator
from lorafair.aggregation.rules import ClientRule
from lorafair.aggregation.updates import GroupResult, LayerGroup


class RoLoRA(Aggregator):
    name: ClassVar[str] = "rolora"
    display_name: ClassVar[str] = "RoLoRA"
    needs: ClassVar[str] = "averages"
    sums_only: ClassVar[bool] = True
    mixed_ranks: ClassVar[bool] = False

    def client_rule(self, round_index: int) -> ClientRule:
        """Odd rounds: train and upload A (B frozen); even rounds: B (A frozen)."""
        factor = "A" if round_index % 2 == 1 else "B"
        return ClientRule(trains=factor, sends=factor)

    def combine(self, group: LayerGroup) -> GroupResult:
        return GroupResult(lora=(group.A_bar, group.B_bar))
