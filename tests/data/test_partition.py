"""Partitions: disjoint, complete, seeded, skewed for small alpha, and clear errors when impossible."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafair.config import FederationConfig
from lorafair.data.partition import dirichlet_split, partition
from lorafair.errors import UserError

NAMES = ["a", "b", "c"]


def domain_labels(sizes=(300, 200, 250), num_classes=10, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, num_classes, size) for size in sizes]


def assert_disjoint_and_complete(parts, labels) -> None:
    everything = np.concatenate([part.indices for part in parts])
    assert len(everything) == len(set(everything.tolist())) == sum(len(x) for x in labels)


def same(parts_a, parts_b) -> bool:
    return len(parts_a) == len(parts_b) and all(
        a.domain == b.domain and np.array_equal(a.indices, b.indices) for a, b in zip(parts_a, parts_b, strict=True))


def test_feature_partition_is_one_client_per_domain():
    labels = domain_labels()
    parts = partition(labels, NAMES, FederationConfig(partition="feature"), seed=0)
    assert [p.domain for p in parts] == [0, 1, 2]
    assert [p.indices.tolist() for p in parts] == [list(range(300)), list(range(300, 500)), list(range(500, 750))]


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(40, 200), min_size=1, max_size=4), clients=st.integers(1, 4),
       alpha=st.sampled_from([0.1, 0.5, 5.0]), seed=st.integers(0, 2**31))
def test_feature_label_partition_is_disjoint_complete_and_stays_in_its_domain(sizes, clients, alpha, seed):
    labels = domain_labels(sizes, seed=seed % 97)
    cfg = FederationConfig(partition="feature_label", clients_per_domain=clients, dirichlet_alpha=alpha,
                           min_client_samples=5)
    parts = partition(labels, [*NAMES, "d"], cfg, seed)
    assert_disjoint_and_complete(parts, labels)
    offsets = np.cumsum([0, *sizes])
    assert [p.domain for p in parts] == [d for d in range(len(sizes)) for _ in range(clients)]
    for part in parts:
        assert len(part.indices) >= 5
        assert offsets[part.domain] <= part.indices.min() and part.indices.max() < offsets[part.domain + 1]
        assert np.all(np.diff(part.indices) > 0)


def test_feature_label_partition_is_seeded():
    labels = domain_labels()
    cfg = FederationConfig(partition="feature_label", clients_per_domain=5, dirichlet_alpha=0.5)
    assert same(partition(labels, NAMES, cfg, 7), partition(labels, NAMES, cfg, 7))
    assert not same(partition(labels, NAMES, cfg, 7), partition(labels, NAMES, cfg, 8))


def mean_label_entropy(parts, labels: np.ndarray) -> float:
    """Mean over clients of the entropy of their label distribution (lower = more skewed)."""
    entropies = []
    for part in parts:
        p = np.bincount(labels[part.indices], minlength=10) / len(part.indices)
        entropies.append(-(p[p > 0] * np.log(p[p > 0])).sum())
    return float(np.mean(entropies))


def test_small_alpha_gives_measurable_label_skew():
    labels = domain_labels((2000, 2000, 2000))
    flat = np.concatenate(labels)

    def entropy(alpha):
        cfg = FederationConfig(partition="feature_label", clients_per_domain=5, dirichlet_alpha=alpha,
                               min_client_samples=2)
        return mean_label_entropy(partition(labels, NAMES, cfg, 0), flat)

    uniform = np.log(10)
    assert entropy(1000.0) > 0.98 * uniform
    assert entropy(0.1) < 0.6 * uniform
    assert entropy(0.1) < entropy(0.5) < entropy(5.0)


def test_dirichlet_split_cuts_each_class_completely_by_its_proportions():
    labels = np.tile(np.arange(4), 1000)  # classes interleaved: indices, not positions, are what gets cut
    for alpha in (1e6, 1.0, 1e-3):
        shares = dirichlet_split(labels, 3, alpha=alpha, rng=np.random.default_rng(0))
        assert np.array_equal(np.sort(np.concatenate(shares)), np.arange(4000))  # disjoint and complete
        counts = np.array([np.bincount(labels[s], minlength=4) for s in shares])
        if alpha == 1e6:  # proportions all but equal: a third of each class, give or take rounding
            assert np.all(np.abs(counts - 1000 / 3) <= 5)
        elif alpha == 1e-3:  # proportions all but one-hot: each class goes (almost) whole to one client
            assert np.all(counts.max(axis=0) >= 995)
        else:  # a proper draw: the classes are cut differently
            assert len({tuple(column) for column in counts.T}) == 4


def test_iid_partition_mixes_domains_evenly():
    labels = domain_labels()
    parts = partition(labels, NAMES, FederationConfig(partition="iid", num_clients=4), seed=3)
    assert_disjoint_and_complete(parts, labels)
    assert [p.domain for p in parts] == [None] * 4
    assert sorted(len(p.indices) for p in parts) == [187, 187, 188, 188]
    assert all(np.any(p.indices < 300) and np.any(p.indices >= 500) for p in parts)
    assert same(parts, partition(labels, NAMES, FederationConfig(partition="iid", num_clients=4), seed=3))
    assert not same(parts, partition(labels, NAMES, FederationConfig(partition="iid", num_clients=4), seed=4))


def test_impossible_partitions_are_clear_errors():
    labels = domain_labels((300, 20, 250))
    cfg = FederationConfig(partition="feature_label", clients_per_domain=5, min_client_samples=10)
    with pytest.raises(UserError, match=r"domain 'b' has 20 training samples, fewer than "
                                        r"federation.clients_per_domain=5 x federation.min_client_samples=10 = 50"):
        partition(labels, NAMES, cfg, 0)
    cfg = FederationConfig(partition="feature_label", clients_per_domain=5, min_client_samples=4,
                           dirichlet_alpha=0.001)
    with pytest.raises(UserError, match=r"no Dirichlet\(federation.dirichlet_alpha=0.001\) draw in \d+ gave each "
                                        r"of the 5 clients of domain 'b'"):
        partition(labels, NAMES, cfg, 0)
    with pytest.raises(UserError, match=r"federation\.num_clients=571 is more than the 570 training samples"):
        partition(labels, NAMES, FederationConfig(partition="iid", num_clients=571), 0)
    with pytest.raises(UserError, match="domain 'c' has no training samples"):
        partition([labels[0], labels[1], np.array([], dtype=np.int64)], NAMES, FederationConfig(), 0)
