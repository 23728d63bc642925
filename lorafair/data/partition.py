"""Split the domains' training samples into clients. Pure functions of (labels, settings, seed).

Samples are addressed by their index in the concatenation of all domains' training sets, in domain order, so a
partition is a list of index arrays that every rank computes identically without exchanging anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorafair.config import FederationConfig
from lorafair.errors import UserError

MAX_DIRICHLET_DRAWS = 1000
"""A feature_label draw that leaves a client below min_client_samples is re-drawn at most this many times."""


@dataclass(frozen=True)
class ClientPart:
    """One client's share: its domain's position (None when drawn from all domains) and sorted sample indices."""

    domain: int | None
    indices: np.ndarray


def _offsets(domain_labels: Sequence[Sequence[int]]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(labels) for labels in domain_labels])])


def partition_feature(domain_labels: Sequence[Sequence[int]], domain_names: Sequence[str]) -> list[ClientPart]:
    """One client per domain holding all of that domain's training samples."""
    offsets = _offsets(domain_labels)
    for position, labels in enumerate(domain_labels):
        if len(labels) == 0:
            raise UserError(f"domain {domain_names[position]!r} has no training samples, so its client would be "
                            f"empty; drop it from data.domains")
    return [ClientPart(d, np.arange(offsets[d], offsets[d + 1])) for d in range(len(domain_labels))]


def dirichlet_split(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """One draw: for every class, shuffle its samples and cut them among clients by Dirichlet(alpha) proportions."""
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.round(np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for client, part in enumerate(np.split(members, cuts)):
            shares[client].append(part)
    return [np.sort(np.concatenate(parts)) for parts in shares]


def partition_feature_label(domain_labels: Sequence[Sequence[int]], domain_names: Sequence[str],
                            clients_per_domain: int, alpha: float, min_client_samples: int, seed: int
                            ) -> list[ClientPart]:
    """clients_per_domain clients per domain; within a domain each class is split among its clients by
    Dirichlet(alpha) (small alpha: each client sees few classes). Draws leaving a client with fewer than
    min_client_samples are re-drawn, up to MAX_DIRICHLET_DRAWS times per domain."""
    offsets = _offsets(domain_labels)
    parts = []
    for position, labels in enumerate(domain_labels):
        labels = np.asarray(labels, dtype=np.int64)
        name = domain_names[position]
        needed = clients_per_domain * min_client_samples
        if len(labels) < needed:
            raise UserError(f"domain {name!r} has {len(labels)} training samples, fewer than "
                            f"federation.clients_per_domain={clients_per_domain} x federation.min_client_samples="
                            f"{min_client_samples} = {needed}; lower one of them")
        rng = np.random.default_rng([seed, position])
        for _ in range(MAX_DIRICHLET_DRAWS):
            shares = dirichlet_split(labels, clients_per_domain, alpha, rng)
            if min(len(share) for share in shares) >= min_client_samples:
                break
        else:
            raise UserError(f"no Dirichlet(federation.dirichlet_alpha={alpha}) draw in {MAX_DIRICHLET_DRAWS} gave each "
                            f"of the {clients_per_domain} clients of domain {name!r} ({len(labels)} samples) at "
                            f"least federation.min_client_samples={min_client_samples}; lower min_client_samples or "
                            f"clients_per_domain, or raise dirichlet_alpha")
        parts += [ClientPart(position, offsets[position] + share) for share in shares]
    return parts


def partition_iid(domain_labels: Sequence[Sequence[int]], num_clients: int, seed: int) -> list[ClientPart]:
    """num_clients clients of (nearly) equal size drawn uniformly from the union of all domains."""
    total = int(_offsets(domain_labels)[-1])
    if total < num_clients:
        raise UserError(f"federation.num_clients={num_clients} is more than the {total} training samples of all "
                        f"domains; lower it")
    order = np.random.default_rng(seed).permutation(total)
    return [ClientPart(None, np.sort(share)) for share in np.array_split(order, num_clients)]


def partition(domain_labels: Sequence[Sequence[int]], domain_names: Sequence[str], federation: FederationConfig,
              seed: int) -> list[ClientPart]:
    """The partition the federation settings ask for."""
    if federation.partition == "feature":
        return partition_feature(domain_labels, domain_names)
    if federation.partition == "feature_label":
        return partition_feature_label(domain_labels, domain_names, federation.clients_per_domain,
                                       federation.dirichlet_alpha, federation.min_client_samples, seed)
    if federation.partition == "iid":
        return partition_iid(domain_labels, federation.num_clients, seed)
    raise UserError(f"federation.partition={federation.partition!r} is not one of feature, feature_label, iid")
