"""What a method's clients do in a round (`ClientRule`): the LoRA factors they train, the ones they upload and the
ones each keeps as its own between rounds.

A method declares its rule in `Aggregator.client_rule(round_index)`; the round loop trains and starts its clients by
it, the server folds only what the rule uploads (the rest is the round's template, unchanged), and the checkpoints
hold what it keeps. Nobody asks which method it is.

A client starts a round from the server's state with the tensors it keeps in their place: its own once it trained, the
run's initial ones before that. A factor that is neither trained nor kept is frozen this round: every client must
return the server's value unchanged (`frozen`).

A rule may also give each client a local adapter (`LocalAdapter`): a second LoRA pair per adapted layer that the
client trains and keeps as its own and never uploads, mixed with the shared pair (FedDPA).
"""

from __future__ import annotations

from dataclasses import dataclass

FACTORS = "AB"
"""The two factors of a LoRA pair, in the order of the pair: A (r x in), then B (out x r)."""
FACTOR_SETS = ("", "A", "B", "AB")


@dataclass(frozen=True)
class LocalAdapter:
    """A second LoRA pair per adapted layer that each client keeps as its own (never uploaded), of the shared pair's
    rank and scaling. Each round the client first trains it, the shared pair and the head frozen and the layer's
    output  W0 x + shared_weight * s B A x + (1 - shared_weight) * s B_l A_l x,  then trains the shared pair (and
    head) alone. Its own model mixes the two per input: the local adapter gets alpha(x) = similarity_scale *
    mean_j cos(e(x), e(x_j)) over `instances` of its training inputs x_j (e: the model's representation of an input
    under the local adapter), the shared pair 1 - alpha(x)."""

    shared_weight: float = 0.5
    similarity_scale: float = 0.5
    instances: int = 5


@dataclass(frozen=True)
class ClientRule:
    """One round of a method's clients. The extra tensors (a classifier's head) always train and travel, unless
    `keeps_extra`."""

    trains: str = "AB"
    """The factors clients train this round: "AB", "A" or "B"."""
    sends: str = "AB"
    """The factors clients upload: the server averages these and takes the others from its template."""
    keeps: str = ""
    """The factors each client keeps between rounds, its own (never uploaded): "" (none), "A", "B" or "AB"."""
    keeps_extra: bool = False
    """Whether each client also keeps its own extra tensors (the local bound: a client keeps its whole state)."""
    core: bool = False
    """Whether A trains only as R A0, its r x r core R over the run's fixed A0 of orthonormal rows that every client
    holds, and travels as R, r^2 numbers a layer each way (Fed-SB)."""
    local: LocalAdapter | None = None
    """A local adapter each client trains and keeps besides the shared pair (`LocalAdapter`); None: none."""

    def __post_init__(self) -> None:
        for name in ("trains", "sends", "keeps"):
            value = getattr(self, name)
            if value not in FACTOR_SETS:
                raise ValueError(f"ClientRule.{name} must be one of {FACTOR_SETS}, got {value!r}")
        if not set(self.sends) <= set(self.trains):
            raise ValueError(f"ClientRule: clients upload {self.sends} but train only {self.trains!r}; a frozen "
                             "factor is the server's already")
        if set(self.sends) & set(self.keeps):
            raise ValueError(f"ClientRule: {self.sends} is uploaded and {self.keeps} kept; a factor is either "
                             "averaged or a client's own")
        if self.core and ("A" not in self.sends or "A" in self.keeps):
            raise ValueError(f"ClientRule: core sends A as its r x r core, but clients upload {self.sends!r} and keep "
                             f"{self.keeps!r}; upload A (sends with A, keeps without it) or leave core False")
        if not set(self.trains) <= set(self.sends) | set(self.keeps):
            raise ValueError(f"ClientRule: clients train {self.trains} but upload {self.sends!r} and keep "
                             f"{self.keeps!r}; a trained factor would be lost")

    @property
    def frozen(self) -> str:
        """The factors every client holds at the server's value this round: neither trained nor kept."""
        return "".join(factor for factor in FACTORS if factor not in self.trains and factor not in self.keeps)

    @property
    def personal(self) -> bool:
        """Whether clients keep anything of their own between rounds (and have a model of their own to score)."""
        return bool(self.keeps) or self.keeps_extra or self.local is not None
