"""Datasets (DomainNet, NICO++, image folders, the generated shapes benchmark, the embedded digits demo) and their
split into federated clients."""

from lorafair.data.federated import (
    Client,
    FederatedData,
    build_client_data,
    build_federated_data,
    evaluation_loaders,
)
from lorafair.data.loader import make_loader
from lorafair.data.transforms import model_data_config

__all__ = ["Client", "FederatedData", "build_client_data", "build_federated_data", "evaluation_loaders", "make_loader",
           "model_data_config"]
