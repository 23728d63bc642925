"""The round pre-reduced on the ranks (each rank folds its clients, the ranks sum the accumulators) against today's
gather path (rank 0 aggregates every good update in one call), on two gloo ranks."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lorafair.aggregation import ClientUpdate, build_aggregator
from lorafair.config import ServerConfig
from lorafair.errors import UserError
from lorafair.federated.loop import FederatedTrainer
from lorafair.federated.server import Server, aggregator_options
from lorafair.federated.state import ClientResult, GlobalState
from lorafair.federated.transport import TorchDistributedTransport
from tests.helpers import SEVERAL_PROCESSES

pytestmark = SEVERAL_PROCESSES

LAYERS = {"blocks.0.attn.proj": (12, 8), "blocks.1.attn.proj": (12, 8), "blocks.0.mlp.fc1": (6, 8)}
"""Layer -> (out, in): two layer groups."""
RANK = 2
CLIENTS = 6
HOSTINGS = {"alternate": ([0, 2, 4], [1, 3, 5]), "all bad on rank 1": ([0, 1, 2, 4, 5], [3]),
            "none on rank 1": (list(range(CLIENTS)), [])}
"""Which clients each rank hosts; client 3 is poisoned."""
POISONED = 3


def _template() -> GlobalState:
    generator = torch.Generator().manual_seed(0)
    lora = {name: (torch.randn(RANK, fan_in, generator=generator), torch.zeros(fan_out, RANK))
            for name, (fan_out, fan_in) in LAYERS.items()}
    return GlobalState(lora, {"head.weight": torch.zeros(3, 8)})


def _results(method: str, start: GlobalState) -> list[ClientResult]:
    """Client results in client order: random factors (A the template's under FFA-LoRA), client 3 poisoned."""
    results = []
    for client in range(CLIENTS):
        generator = torch.Generator().manual_seed(100 + client)
        lora = {name: (A.clone() if method == "ffa_lora" else torch.randn(A.shape, generator=generator),
                       torch.randn(B.shape, generator=generator)) for name, (A, B) in start.lora.items()}
        extra = {"head.weight": torch.randn(3, 8, generator=generator)}
        if client == POISONED:
            lora["blocks.1.attn.proj"][1][0, 0] = float("nan")
        update = ClientUpdate(weight=10 + 7 * client, lora=lora, extra=extra)
        results.append(ClientResult(client=client, update=update, train_loss=0.5 + client, steps=3,
                                    skipped_images=client % 2))
    return results


def _pre_reduced(method: str, hosted: list[int], on_bad_update: str = "drop", results=None):
    """This rank's answer from the round loop's own `aggregate`, with its clients `hosted`."""
    start = _template()
    results = results or _results(method, start)
    trainer = SimpleNamespace(global_state=start, transport=TorchDistributedTransport(torch.device("cpu")),
                              server=Server(ServerConfig(method=method, steps=20), on_bad_update, seed=0,
                                            log=lambda _: None), server_seconds=0.0, setting="federated")
    trainer.finish_round = functools.partial(FederatedTrainer.finish_round, trainer)
    return FederatedTrainer.aggregate(trainer, 1, [results[client] for client in hosted], list(range(CLIENTS)))


def _gathered(method: str):
    """Today's gather path: rank 0 aggregates every good update in one call."""
    options = aggregator_options(ServerConfig(method=method, steps=20), seed=0, round_index=1)
    results = _results(method, _template())
    return build_aggregator(method, **options).aggregate([r.update for r in results if r.client != POISONED])


def _same(answer, expected) -> None:
    for name in expected.lora or {}:
        for got, want in zip(answer.lora[name], expected.lora[name], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (answer.merge is None) == (expected.merge is None)
    for name in expected.merge or {}:  # a merge is used as its product
        got, want = answer.merge[name][1] @ answer.merge[name][0], expected.merge[name][1] @ expected.merge[name][0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(answer.extra["head.weight"], expected.extra["head.weight"], rtol=1e-6, atol=1e-7)
    record = answer.record
    assert (record.bytes_up, record.bytes_down) == (expected.bytes_up, expected.bytes_down)
    for key, value in expected.metrics.items():
        if not key.endswith("seconds"):
            assert record.aggregation[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def _two_ranks(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for method in ("fedit", "ffa_lora", "flora", "flexlora", "lorafair", "florana", "fedex_lora"):
            expected = _gathered(method)
            for hosting in HOSTINGS.values():
                answer = _pre_reduced(method, hosting[rank])  # the same answer on every rank
                _same(answer, expected)
                assert answer.record.bad_updates == {"3": "NaN or Inf in layer 'blocks.1.attn.proj' B"}
                assert answer.record.train_loss == {str(client): 0.5 + client for client in range(CLIENTS)}
                assert answer.record.skipped_images == 3 and not answer.record.skipped

        # on_bad_update=error stops both ranks with one message, whichever rank hosts the bad client
        with pytest.raises(UserError, match=r"^round 1: bad client update \(client 3: NaN or Inf in layer"):
            _pre_reduced("fedit", HOSTINGS["alternate"][rank], on_bad_update="error")
        # FFA-LoRA: a client of rank 1 whose A differs stops both ranks
        results = _results("ffa_lora", _template())
        results[5].update.lora["blocks.0.mlp.fc1"][0].add_(1.0)
        with pytest.raises(UserError, match=r"aggregation failed: ffa_lora: client 5 sent a different A"):
            _pre_reduced("ffa_lora", HOSTINGS["alternate"][rank], results=results)
        # every client bad: both ranks skip the round and make no sum
        results = _results("fedit", _template())
        for result in results:
            result.train_loss = float("nan")
        answer = _pre_reduced("fedit", HOSTINGS["alternate"][rank], results=results)
        assert answer.record.skipped and answer.lora is None and len(answer.record.bad_updates) == CLIENTS
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_pre_reduced_round_equals_the_gathered_round_on_two_ranks(tmp_path):
    mp.spawn(_two_ranks, args=(str(tmp_path / "store"),), nprocs=2)


@pytest.mark.parametrize("method", ["fedit", "ffa_lora", "flexlora", "lorafair", "florana", "flora", "fedex_lora"])
def test_what_the_ranks_sum_does_not_grow_with_the_clients_for_foldable_methods(method):
    """Past the crossover the accumulators of a foldable method have a fixed size: rank 0 receives the same bytes
    at 50 or 500 clients. FLoRA and FedEx-LoRA send every client's factors on, so theirs hold one slot per client
    (their sum over ranks is a gather of the factors)."""
    server = Server(ServerConfig(method=method, steps=20), "drop", seed=0)
    start = _template()
    like = ClientUpdate(weight=1.0, lora=start.lora, extra=start.extra)
    results = _results(method, start)[:2]

    def reduced_bytes(clients: int) -> int:
        fold = server.fold(1, results, [0, clients - 1], like, clients)
        return sum(t.numel() * t.element_size() for t in fold.state.accumulators())

    per_client = sum(A.numel() * 4 + B.numel() * 4 for A, B in start.lora.values())
    if method in ("flora", "fedex_lora"):
        assert reduced_bytes(500) - reduced_bytes(50) >= 450 * per_client
    else:
        assert reduced_bytes(500) == reduced_bytes(50) < 50 * per_client
