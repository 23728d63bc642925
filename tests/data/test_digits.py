"""The embedded digits demo set (its `lorafair data` summary: test_summary.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lorafair.config import DataConfig, FederationConfig, ModelConfig
from lorafair.data import build_federated_data, make_loader, model_data_config
from lorafair.data.digits import DOMAINS, build_domains, pretraining_set, render
from lorafair.errors import UserError
from tests.helpers import DIGITS_VIT

DATA_CONFIG = {"input_size": (3, 24, 24), "interpolation": "bicubic", "mean": (0.5, 0.4, 0.3),
               "std": (0.2, 0.25, 0.3), "crop_pct": 0.9}


def all_sources(domains) -> list[np.ndarray]:
    return [torch.cat([d.train.source_indices, d.test.source_indices]).numpy() for d in domains]


def test_six_domains_from_disjoint_images_without_the_reserved_pool():
    domains = build_domains(seed=0, test_fraction=0.25, data_config=DATA_CONFIG)
    assert [d.name for d in domains] == list(DOMAINS) and len(DOMAINS) == 6
    sources = all_sources(domains)
    everything = np.concatenate(sources)
    assert len(everything) == len(set(everything.tolist())) == 1797 - 257
    assert not np.any(everything % 7 == 0)
    targets = load_digits().target
    for domain in domains:
        assert abs(len(domain.test) - 0.25 * (len(domain.train) + len(domain.test))) <= 1
        assert np.array_equal(domain.train.labels.numpy(), targets[domain.train.source_indices.numpy()])
        assert set(domain.train.labels.tolist()) == set(range(10))
        image, label = domain.train[0]
        assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and isinstance(label, int)


def test_domains_are_deterministic_for_a_seed_and_differ_between_seeds():
    first = build_domains(seed=5, test_fraction=0.2, data_config=DATA_CONFIG)
    again = build_domains(seed=5, test_fraction=0.2, data_config=DATA_CONFIG)
    other = build_domains(seed=6, test_fraction=0.2, data_config=DATA_CONFIG)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.train.pixels, b.train.pixels) and torch.equal(a.test.labels, b.test.labels)
    assert not all(np.array_equal(a, b) for a, b in zip(all_sources(first), all_sources(other), strict=True))


def test_styles_differ_visibly_and_items_are_normalised_with_the_data_config():
    ink = torch.as_tensor(load_digits().images[1:9], dtype=torch.float32) / 16
    generator = torch.Generator().manual_seed(0)
    styled = {style: render(ink, style, (16, 16), generator) for style in DOMAINS}
    for style, pixels in styled.items():
        assert pixels.shape == (8, 3, 16, 16) and pixels.min() >= 0 and pixels.max() <= 1
        if style != "plain":
            assert (pixels - styled["plain"]).abs().mean() > 0.05, style
    assert torch.allclose(styled["inverted"], 1 - styled["plain"])
    assert torch.allclose(styled["rotated"], torch.rot90(styled["plain"], 1, (2, 3)))

    domain = build_domains(seed=0, test_fraction=0.2, data_config=DATA_CONFIG, domains=["coloured"])[0]
    raw = domain.test.pixels[3].float() / 255
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    assert torch.allclose(domain.test[3][0], (raw - mean) / std)


def test_pretraining_set_is_the_reserved_pool_in_plain_style():
    images, labels = pretraining_set(image_size=16)
    digits = load_digits()
    reserved = np.arange(1797) % 7 == 0
    assert images.shape == (257, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.min() >= 0 and images.max() <= 1
    assert np.array_equal(labels.numpy(), digits.target[reserved])
    ink = torch.as_tensor(digits.images[reserved], dtype=torch.float32) / 16
    assert torch.allclose(images, render(ink, "plain", (16, 16), torch.Generator()))


def test_federated_digits_with_class_filter_augmentation_and_a_loader():
    data = DataConfig(name="digits", domains=["noisy", "plain"], num_classes=4, augment=True)
    fd = build_federated_data(data, FederationConfig(partition="feature_label", clients_per_domain=2), 0, DATA_CONFIG)
    assert fd.domains == ["noisy", "plain"] and fd.classes == ["0", "1", "2", "3"]
    assert [c.domain for c in fd.clients] == ["noisy", "noisy", "plain", "plain"]
    for client in fd.clients:
        assert sum(client.class_counts) == client.num_samples == len(client.dataset)
    loader = make_loader(fd.clients[0].dataset, 16, shuffle=True, seed=1, num_workers=0, drop_last=True)
    batches = list(loader)
    assert len(batches) == fd.clients[0].num_samples // 16 and loader.skipped == 0
    images, labels = batches[0]
    assert images.shape == (16, 3, 24, 24) and labels.max() < 4


@pytest.mark.parametrize("augment", [False, True])
def test_augment_redraws_each_fetch_of_a_training_image_and_never_a_test_image(augment):
    fd = build_federated_data(DataConfig(name="digits", domains=["plain"], augment=augment), FederationConfig(), 0,
                              DATA_CONFIG)
    torch.manual_seed(0)
    train = fd.clients[0].dataset
    assert torch.equal(train[0][0], train[0][0]) != augment
    assert torch.equal(fd.test["plain"][0][0], fd.test["plain"][0][0])


def test_model_data_config_needs_no_weights_and_honours_img_size():
    assert model_data_config(DIGITS_VIT)["input_size"] == (3, 32, 32)
    assert model_data_config(DIGITS_VIT, image_size=48)["input_size"] == (3, 48, 48)
    mixer = model_data_config(ModelConfig(name="mixer_b16_224.goog_in21k"))
    assert mixer["input_size"] == (3, 224, 224) and mixer["crop_pct"] == 0.875 and mixer["mean"] == (0.5, 0.5, 0.5)
    small_mixer = ModelConfig(name="mlp_mixer", kwargs={"img_size": 64, "num_blocks": 1, "embed_dim": 32})
    assert model_data_config(small_mixer)["input_size"] == (3, 64, 64)
    with pytest.raises(UserError, match=r"model\.name: unknown timm model 'no_such_net'"):
        model_data_config(ModelConfig(name="no_such_net"))


@pytest.mark.parametrize("bad", [["sketch"], ["plain", "plain"]])
def test_bad_digits_domains(bad):
    with pytest.raises(UserError, match=r"data\.domains"):
        build_federated_data(DataConfig(name="digits", domains=bad), FederationConfig(), 0, DATA_CONFIG)
