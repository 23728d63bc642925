"""RoLoRA (Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA", arXiv
2502.01755): the factors alternate by round. In odd rounds clients train and upload B only, A frozen at the shared
value; in even rounds A only, B frozen. The server averages the factor that was sent and keeps the other:

    odd:  B' = sum p_k B_k,  A' = A    and  sum p_k B_k A = B' A  exactly
    even: A' = sum p_k A_k,  B' = B    and  sum p_k B A_k = B A'  exactly

so the averaged pair is the ideal update with no aggregation error, and each client uploads (and downloads) one
factor a round. Every client starts a round from the server's pair (`Aggregator.refusal` checks that the frozen
factor came back unchanged).

B goes first because runs start LoRA the standard way, A random and B = 0: with B = 0 the gradient of the loss with
respect to A is zero (it passes through B), so a round that trains A alone cannot move the product B A. The
alternation therefore starts from the up-projection B, as alternating LoRA does from a zero start.

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
        """Odd rounds: train and upload B (A frozen); even rounds: A (B frozen). B first: at the start B = 0, so A
        alone would get no gradient."""
        factor = "B" if round_index % 2 == 1 else "A"
        return ClientRule(trains=factor, sends=factor)

    def combine(self, group: LayerGroup) -> GroupResult:
        return GroupResult(lora=(group.A_bar, group.B_bar))
