"""The generated shapes benchmark (data.name shapes, the demo's data) and its split into clients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafair.config import DataConfig, FederationConfig
from lorafair.data import build_federated_data
from lorafair.data.shapes import (
    CLASSES,
    DOMAINS,
    PRETRAINING_CLASSES,
    build_domains,
    pretraining_batch,
    render,
    signed_distance,
)
from lorafair.errors import UserError

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5, 0.4, 0.3),
               "std": (0.2, 0.25, 0.3), "crop_pct": 0.9}
RAW = {**DATA_CONFIG, "mean": (0.0,) * 3, "std": (1.0,) * 3}


@pytest.fixture(scope="module")
def small():
    """All six domains, 3 training and 5 test images per class."""
    return build_domains(seed=0, data_config=RAW, train_per_class=3, test_per_class=5)


def pixels(dataset) -> torch.Tensor:
    return dataset.pixels.float() / 255


def test_six_domains_with_every_class_in_the_asked_counts(small):
    assert [d.name for d in small] == list(DOMAINS) and len(DOMAINS) == 6 and len(CLASSES) >= 20
    for domain in small:
        for dataset, per_class in ((domain.train, 3), (domain.test, 5)):
            assert torch.bincount(dataset.labels, minlength=len(CLASSES)).tolist() == [per_class] * len(CLASSES)
            assert dataset.pixels.shape == (per_class * len(CLASSES), 3, 32, 32)


def test_default_sizes_give_large_test_sets_and_small_training_sets():
    domain = build_domains(seed=0, data_config=RAW, domains=["sketch"])[0]
    assert len(domain.test) == 2000 and len(domain.train) == 12 * 20


def test_deterministic_for_a_seed_and_different_for_another(small):
    again = build_domains(seed=0, data_config=RAW, train_per_class=3, test_per_class=5)
    other = build_domains(seed=1, data_config=RAW, train_per_class=3, test_per_class=5)
    for a, b, c in zip(small, again, other, strict=True):
        assert torch.equal(a.train.pixels, b.train.pixels) and torch.equal(a.test.pixels, b.test.pixels)
        assert torch.equal(a.train.labels, b.train.labels)
        assert not torch.equal(a.test.pixels, c.test.pixels) and not torch.equal(a.train.pixels, c.train.pixels)


def test_train_and_test_are_disjoint_and_the_test_set_ignores_the_training_size(small):
    for domain in small:
        train, test = pixels(domain.train).flatten(1), pixels(domain.test).flatten(1)
        assert torch.cdist(train, test).min() > 0.5  # no image in both, nor a near copy
        assert set(domain.train.source_indices.tolist()).isdisjoint(domain.test.source_indices.tolist())
    bigger = build_domains(seed=0, data_config=RAW, train_per_class=7, test_per_class=5, domains=["clipart"])[0]
    assert torch.equal(bigger.test.pixels, small[2].test.pixels)
    assert not torch.equal(bigger.train.pixels[:60], small[2].train.pixels)


def test_images_are_in_range_and_items_are_normalised_with_the_data_config():
    domain = build_domains(seed=0, data_config=DATA_CONFIG, domains=["painting"], train_per_class=1,
                           test_per_class=1)[0]
    raw = domain.test.pixels[3].float() / 255
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    image, label = domain.test[3]
    assert image.shape == (3, 32, 32) and isinstance(label, int) and torch.allclose(image, (raw - mean) / std)
    for style in (*DOMAINS, "plain"):
        drawn = render(torch.arange(20), CLASSES if style != "plain" else PRETRAINING_CLASSES, style, 24,
                       torch.Generator().manual_seed(0))
        assert drawn.shape == (20, 3, 24, 24) and drawn.min() >= 0 and drawn.max() <= 1, style


def test_domains_differ_in_pixel_statistics(small):
    stats = {}
    for domain in small:
        images = pixels(domain.test)
        colourfulness = (images - images.mean(1, keepdim=True)).abs().mean().item()
        brightness = images.mean().item()
        sharpness = (images[..., 1:] - images[..., :-1]).abs().mean().item()
        stats[domain.name] = np.array([colourfulness, brightness, sharpness])
    assert stats["sketch"][0] < 1e-6 and stats["quickdraw"][0] < 1e-6  # grey
    assert stats["clipart"][0] > 0.05 and stats["photo"][0] > 0.05
    assert stats["painting"][2] < stats["photo"][2]  # blurred
    assert stats["quickdraw"][1] > stats["sketch"][1] > stats["photo"][1]  # thin strokes on white
    names = list(stats)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(stats[a] - stats[b]).max() > 0.01, (a, b)


def test_classes_are_drawn_as_different_shapes():
    """Each class's mask (same pose for all) differs from every other's, so no two classes are one shape."""
    generator_seed = 3
    masks = []
    for classes in (CLASSES, PRETRAINING_CLASSES):
        for label in range(len(classes)):
            pose = torch.Generator().manual_seed(generator_seed)
            distance = signed_distance(torch.tensor([label]), classes, 32, pose)
            masks.append((distance < 0).float().flatten())
    masks = torch.stack(masks)
    assert masks.sum(1).min() > 20  # none is empty
    assert torch.cdist(masks, masks).add(torch.eye(len(masks)) * 100).min() ** 2 >= 8  # >= 8 pixels apart


def test_pretraining_classes_are_disjoint_from_the_benchmark():
    assert not set(PRETRAINING_CLASSES) & set(CLASSES) and len(PRETRAINING_CLASSES) >= 10
    images, labels = pretraining_batch(50, 32, torch.Generator().manual_seed(0))
    assert images.shape == (50, 3, 32, 32) and labels.max() < len(PRETRAINING_CLASSES)
    assert torch.equal(images, pretraining_batch(50, 32, torch.Generator().manual_seed(0))[0])


def test_clients_feature_and_label_skew():
    data_cfg = DataConfig(name="shapes", train_per_class=10, test_per_class=2)
    feature = build_federated_data(data_cfg, FederationConfig(partition="feature"), 0, DATA_CONFIG)
    assert [c.domain for c in feature.clients] == list(DOMAINS) and feature.classes == list(CLASSES)
    assert all(c.class_counts == [10] * 20 for c in feature.clients)
    skewed = build_federated_data(data_cfg, FederationConfig(partition="feature_label", clients_per_domain=3,
                                                             dirichlet_alpha=0.3), 0, DATA_CONFIG)
    assert len(skewed.clients) == 18 and [c.domain for c in skewed.clients[:3]] == ["photo"] * 3
    counts = np.array([c.class_counts for c in skewed.clients[:3]])
    assert counts.sum(0).tolist() == [10] * 20 and (counts == 0).any()  # one domain's classes, split unevenly
    sub = build_federated_data(DataConfig(name="shapes", domains=["infograph", "sketch"], num_classes=4,
                                          train_per_class=2, test_per_class=3), FederationConfig(), 0, DATA_CONFIG)
    assert sub.domains == ["infograph", "sketch"] and sub.classes == list(CLASSES[:4]) and len(sub.test["sketch"]) == 12


def test_an_unknown_domain_is_refused():
    with pytest.raises(UserError, match="shapes has no domain 'photos'"):
        build_domains(seed=0, data_config=RAW, domains=["photos"])
