"""From the data and federation settings to clients and per-domain test sets: the one entry point of the trainer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from lorafair.config import DataConfig, FederationConfig
from lorafair.data import digits, shapes
from lorafair.data.cache import CachedImageDataset, cache_dir, human_size, pixel_recipes
from lorafair.data.image_files import DOMAINNET, NICOPP, ImageFileDataset, read_image_folders, read_split_file_dataset
from lorafair.data.loader import CachedLoader, SkippingLoader, make_loader
from lorafair.data.partition import partition
from lorafair.data.transforms import image_transforms, with_image_size
from lorafair.errors import UserError

MIXED_DOMAIN = "mixed"
"""The domain of a client drawn from all domains (iid partition)."""


@dataclass
class Client:
    """One client's private training data. `id` is its position in FederatedData.clients."""

    id: int
    domain: str
    dataset: Dataset
    num_samples: int
    class_counts: list[int]


@dataclass
class FederatedData:
    clients: list[Client]
    test: dict[str, Dataset]
    """Each domain's test set, in domain order."""
    domains: list[str]
    classes: list[str]
    """Class names; label i is classes[i]."""
    train: dict[str, Dataset] = field(default_factory=dict)
    """Each domain's training set, in domain order (the clients hold parts of them)."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class _Domain:
    name: str
    train: Dataset
    test: Dataset
    train_labels: np.ndarray


def _read_domains(data_cfg: DataConfig, seed: int, data_config: dict) -> tuple[list[_Domain], list[str]]:
    if data_cfg.name == "digits":
        built = digits.build_domains(seed, data_cfg.test_fraction, data_config, data_cfg.domains,
                                     data_cfg.num_classes, data_cfg.augment)
        classes = list(digits.CLASSES[:data_cfg.num_classes])
        return [_Domain(d.name, d.train, d.test, d.train.labels.numpy()) for d in built], classes
    if data_cfg.name == "shapes":
        built = shapes.build_domains(seed, data_config, data_cfg.domains, data_cfg.num_classes, data_cfg.augment,
                                     data_cfg.train_per_class, data_cfg.test_per_class)
        classes = list(shapes.CLASSES[:data_cfg.num_classes])
        return [_Domain(d.name, d.train, d.test, d.train.labels.numpy()) for d in built], classes
    root = data_cfg.root
    if data_cfg.name == "folders":
        files, classes = read_image_folders(root, data_cfg.domains, data_cfg.num_classes, data_cfg.test_fraction, seed,
                                            data_cfg.on_bad_image)
    else:
        layout = DOMAINNET if data_cfg.name == "domainnet" else NICOPP
        files, classes = read_split_file_dataset(root, layout, data_cfg.domains, data_cfg.num_classes)
    train_transform, eval_transform = image_transforms(data_config, data_cfg)
    directory = cache_dir(data_cfg.cache)
    if directory is None:
        def split_dataset(samples, domain_name, split):
            return ImageFileDataset(samples, train_transform if split == "train" else eval_transform,
                                    data_cfg.on_bad_image)
    else:
        recipes = dict(zip(("train", "test"), pixel_recipes(train_transform, eval_transform, data_cfg.augment,
                                                            data_config["input_size"]), strict=True))

        def split_dataset(samples, domain_name, split):
            return CachedImageDataset(samples, recipes[split], directory, f"{data_cfg.name}-{domain_name}-{split}",
                                      data_cfg.on_bad_image, data_cfg.num_workers)
    domains = []
    for domain in files:
        train = split_dataset(domain.train, domain.name, "train")
        test = split_dataset(domain.test, domain.name, "test")
        domains.append(_Domain(domain.name, train, test, train.labels))
    return domains, classes


def build_federated_data(data_cfg: DataConfig, federation_cfg: FederationConfig, seed: int,
                         data_config: dict) -> FederatedData:
    """Read the datasets, render them for the model's timm `data_config` (data.image_size overrides its size) and
    partition the training samples into clients. A pure function of the settings, the seed and the files, so every
    rank builds the same clients."""
    if data_cfg.domains is not None and len(set(data_cfg.domains)) != len(data_cfg.domains):
        raise UserError(f"data.domains lists a domain twice: {data_cfg.domains}")
    domains, classes = _read_domains(data_cfg, seed, with_image_size(data_config, data_cfg.image_size))
    names = [domain.name for domain in domains]
    empty = [domain.name for domain in domains if len(domain.test) == 0]
    if empty:
        raise UserError(f"domain(s) {', '.join(empty)} have no test images (too few images per class for "
                        f"data.test_fraction, or every test line filtered out by data.num_classes); add images or "
                        f"drop the domain from data.domains")
    all_train = ConcatDataset([domain.train for domain in domains])
    all_labels = np.concatenate([domain.train_labels for domain in domains])
    parts = partition([domain.train_labels for domain in domains], names, federation_cfg, seed)
    clients = [Client(id=i, domain=MIXED_DOMAIN if part.domain is None else names[part.domain],
                      dataset=Subset(all_train, part.indices.tolist()), num_samples=len(part.indices),
                      class_counts=np.bincount(all_labels[part.indices], minlength=len(classes)).tolist())
               for i, part in enumerate(parts)]
    return FederatedData(clients=clients, test={domain.name: domain.test for domain in domains}, domains=names,
                         classes=classes, train={domain.name: domain.train for domain in domains})


def evaluation_loaders(test_sets: Sequence[Dataset], shard_index: int, shard_count: int, batch_size: int,
                       num_workers: int, device: torch.device | str = "cpu") -> list[SkippingLoader | CachedLoader]:
    """One loader per test set over its contiguous shard `shard_index` of `shard_count`. Build them once and
    iterate them at every evaluation."""
    loaders = []
    for test in test_sets:
        size = len(test)
        shard = Subset(test, range(shard_index * size // shard_count, (shard_index + 1) * size // shard_count))
        loaders.append(make_loader(shard, batch_size, shuffle=False, seed=0, num_workers=num_workers, device=device))
    return loaders


def build_caches(data: FederatedData, data_cfg: DataConfig) -> str:
    """Build every missing image cache of `data` and fully verify the existing ones (checksum of every byte);
    returns what was done in one line."""
    if data_cfg.name not in ("domainnet", "nicopp", "folders"):
        return f"data.name {data_cfg.name} is held in memory: there is no image cache to build"
    splits = [dataset for domain in data.domains for dataset in (data.train[domain], data.test[domain])]
    if not all(isinstance(dataset, CachedImageDataset) for dataset in splits):
        raise UserError("--build_cache: data.cache is off; set it to auto or a folder")
    stores = [dataset.store(verify=True) for dataset in splits]
    size = sum(int(store.offsets[-1]) for store in stores)
    return f"image cache ready: {len(stores)} splits, {human_size(size)} in {splits[0].directory}"


def build_client_data(data_cfg: DataConfig, federation_cfg: FederationConfig, seed: int, data_config: dict,
                      client_id: int) -> tuple[Client, list[str], Dataset | None]:
    """What a data owner's node holds: client `client_id` of the partition `build_federated_data` makes (so it trains
    the same samples as under `fit`), the class names and its domain's test set (on which a node scores its own
    model where its method has clients keep factors of their own; None for a client of the iid partition). Of file
    datasets it keeps only this client's files, so no other client's training image is ever read (hence no image
    cache: building one decodes every image)."""
    data = build_federated_data(replace(data_cfg, cache="off"), federation_cfg, seed, data_config)
    if not 0 <= client_id < len(data.clients):
        raise UserError(f"partition-id {client_id} is not a client of this partition (0..{len(data.clients) - 1}); "
                        f"give each node one id in that range")
    client = data.clients[client_id]
    return replace(client, dataset=own_files(client.dataset)), data.classes, data.test.get(client.domain)


def own_files(dataset: Dataset) -> Dataset:
    """A client's Subset of the concatenated file datasets as one file dataset of its own samples, in the same
    order; any other dataset as it is."""
    if not (isinstance(dataset, Subset) and isinstance(dataset.dataset, ConcatDataset)
            and all(isinstance(part, ImageFileDataset) for part in dataset.dataset.datasets)):
        return dataset
    parts, ends = dataset.dataset.datasets, dataset.dataset.cumulative_sizes
    samples = []
    for index in dataset.indices:
        position = int(np.searchsorted(ends, index, side="right"))
        local = index - (ends[position - 1] if position else 0)
        samples.append((parts[position].paths[local], int(parts[position].labels[local])))
    return ImageFileDataset(samples, parts[0].transform, parts[0].on_bad_image)
