"""FedDPA (Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models", NeurIPS 2024, arXiv
2403.19211), its iterative variant FedDPA-T: every client holds a global adapter (the shared LoRA pair, uploaded
and averaged as FedIT averages it) and a local adapter (a second LoRA pair of its own, never uploaded). In each round
the client first trains its local adapter with the global one fixed, the layer's output mixing the two as

    h = W0 x + shared_weight * s B_g A_g x + (1 - shared_weight) * s B_l A_l x      (shared_weight 0.5)

then trains the global adapter (and the head) alone and uploads it. The server's step is FedIT's: A_bar = sum p_k A_k,
B_bar = sum p_k B_k over the global pairs only. A client's own model mixes the two adapters per input x:

    h = W0 x + (1 - alpha(x)) s B_g A_g x + alpha(x) s B_l A_l x,
    alpha(x) = similarity_scale * mean_j cos(e(x), e(x_j))                           (similarity_scale 0.5)

over `instances` of the client's training inputs x_j, e the model's representation of an input under the local
adapter alone; the more an input resembles the client's own data, the more the local adapter counts. The mean of
cosines is <e(x)/|e(x)|, m> with m the mean of the normalised e(x_j), so a client keeps m (one vector) besides its
local adapter. The global model is the global adapter alone. `LocalAdapter` in `rules` carries these settings to the
clients; what was read in the paper and its code is in docs/client-methods.md.

Clients of different ranks are refused: a local adapter is held at the global rank. Under `lorafair flower` each
node keeps its local adapter in its node state and it never travels; `LoraStrategy` refuses the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorafair.aggregation.base import Aggregator, check_option, is_count
from lorafair.aggregation.rules import ClientRule, LocalAdapter
from lorafair.aggregation.updates import GroupResult, LayerGroup


@dataclass
class FedDPA(Aggregator):
    shared_weight: float = 0.5
    """Weight of the global adapter's fixed output while a client trains its local adapter, which gets 1 minus it
    (the paper's a, 0.5)."""
    similarity_scale: float = 0.5
    """A client's own model gives its local adapter this times the mean cosine similarity of an input's
    representation to its training inputs' (the code's 0.5), the global adapter the rest."""
    instances: int = 5
    """How many of a client's training inputs (drawn each round) its similarities are taken to (the code's 5)."""

    name: ClassVar[str] = "feddpa"
    display_name: ClassVar[str] = "FedDPA"
    sums_only: ClassVar[bool] = True
    mixed_ranks: ClassVar[bool] = False
    global_model: ClassVar[str] = (
        "the starting backbone (with the averaged head) in base/ and the server's averaged global adapter in the "
        "adapter; each client's own model adds its local adapter, mixed per input by similarity to its training "
        "inputs, which a peft adapter cannot hold; the frozen weights never change.")

    def __post_init__(self) -> None:
        check_option(self.name, "shared_weight", self.shared_weight,
                     isinstance(self.shared_weight, (int, float)) and 0 <= self.shared_weight <= 1,
                     "a number in [0, 1]")
        check_option(self.name, "similarity_scale", self.similarity_scale,
                     isinstance(self.similarity_scale, (int, float)) and 0 <= self.similarity_scale <= 1,
                     "a number in [0, 1]")
        check_option(self.name, "instances", self.instances,
                     is_count(self.instances) and self.instances >= 1,
                     "an integer >= 1")

    def client_rule(self, round_index: int) -> ClientRule:
        """Every round: train the local adapter, then the global pair; upload the global pair, keep the local one."""
        return ClientRule(local=LocalAdapter(float(self.shared_weight), float(self.similarity_scale),
                                             self.instances))

    def combine(self, group: LayerGroup) -> GroupResult:
        return GroupResult(lora=(group.A_bar, group.B_bar))
