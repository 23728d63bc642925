"""The two reference settings a comparison measures the federated methods against (`federation.setting`).

- centralized: one client holds the union of every client's training data and trains, each round, as many local
  steps as the round's sampled clients would have trained together; its answer is taken as it is (averaging one
  update is the identity), so it is the upper bound of any aggregation under the same budget.
- local: every client trains alone from its own previous state and is never aggregated; each is scored on its own
  domain's test set, and a domain's score is the mean over its clients: what a client gets without federating. Its
  client rule (`LOCAL_RULE`) keeps everything, as a personalised method keeps its own factors.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import ConcatDataset, Subset

from lorafair.aggregation import ClientRule
from lorafair.config import ClientConfig
from lorafair.data import Client

UNION_DOMAIN = "all"
"""The domain of the centralized client."""
LOCAL_RULE = ClientRule(trains="AB", sends="", keeps="AB", keeps_extra=True)
"""The local bound's clients: each trains and keeps its whole state (both factors and the head), and uploads nothing
that is aggregated (the server only screens the updates)."""


def union_client(clients: list[Client]) -> Client:
    """One client holding every client's training samples, with an id no client has."""
    datasets = [client.dataset for client in clients]
    bases = {id(dataset.dataset) for dataset in datasets if isinstance(dataset, Subset)}
    if len(bases) == 1 and all(isinstance(dataset, Subset) for dataset in datasets):
        union = Subset(datasets[0].dataset, [index for dataset in datasets for index in dataset.indices])
    else:
        union = ConcatDataset(datasets)
    counts = np.sum([client.class_counts for client in clients], axis=0).tolist()
    return Client(id=len(clients), domain=UNION_DOMAIN, dataset=union,
                  num_samples=sum(client.num_samples for client in clients), class_counts=counts)


def local_steps(num_samples: int, batch_size: int, client_cfg: ClientConfig) -> int:
    """Optimizer steps a client of `num_samples` takes in a round (as `LocalTrainer.train` counts them)."""
    steps = client_cfg.local_epochs * math.ceil(num_samples / batch_size)
    return steps if client_cfg.max_local_steps is None else min(steps, client_cfg.max_local_steps)
