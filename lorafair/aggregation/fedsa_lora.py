"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", arXiv 2410.01463):
clients train both factors, but only A is shared: the server averages A by sample count, A_bar = sum p_k A_k, and
each client keeps its own B between rounds (its initial B = 0 until it first trains). The extra tensors (a
classifier's head) are averaged as every method averages them.

The answer's B is the template's, untouched (the server never sees a B): a client restarts from A_bar with its own
B in its place. `lorafair fit` makes the global model, the one it scores and exports, of A_bar and the sample-weighted
mean of the B every client holds, and scores each client's own model (A_bar, B_k) on its own domain. No cos_avg is
logged: the server's "B_k" is its own copy, not the client's, so its ideal update sum p_k B_k A_k is not the clients'
(it would read 0 in round 1, B = 0, and 1 after).

Clients of different ranks are refused: A_bar over zero-padded lower-rank A would shrink the rows past their rank.
"""

from __future__ import annotations

from typing import ClassVar

from lorafair.aggregation.base import Aggregator
from lorafair.aggregation.rules import ClientRule
from lorafair.aggregation.updates import GroupResult, LayerGroup


class FedSALoRA(Aggregator):
    name: ClassVar[str] = "fedsa_lora"
    display_name: ClassVar[str] = "FedSA-LoRA"
    needs: ClassVar[str] = "averages"
    sums_only: ClassVar[bool] = True
    mixed_ranks: ClassVar[bool] = False
    global_model: ClassVar[str] = (
        "the starting backbone (with the averaged head) in base/ and, in the adapter, the server's averaged A with "
        "the sample-weighted mean of the B every client keeps (each client's own model pairs that A with its own "
        "B); the frozen weights never change.")

    def client_rule(self, round_index: int) -> ClientRule:
        """Every round: train A and B, upload A, keep B."""
        return ClientRule(trains="AB", sends="A", keeps="B")

    def combine(self, group: LayerGroup) -> GroupResult:
        return GroupResult(lora=(group.A_bar, group.B_bar))
