"""What a run trained is what leaves it; the Flower server's reply timeout reaches the grid."""

from __future__ import annotations

from conftest import tiny_config
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity


class RecordingGrid:
    """Six nodes (10 + partition id) that answer the partition query and a training round with the global state
    they were sent, recording the timeout of every send_and_receive."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    def get_node_ids(self) -> list[int]:
        return list(range(10, 16))

    def send_and_receive(self, messages, timeout=None):
        self.timeouts.append(timeout)
        replies = []
        for message in messages:
            if message.metadata.message_type == MessageType.QUERY:
                content = RecordDict({"metrics": MetricRecord({"partition-id": message.metadata.dst_node_id - 10})})
            else:
                content = RecordDict({"arrays": message.content["arrays"], "metrics": MetricRecord(
                    {"num-examples": 5, "train-loss": 1.0, "steps": 1, "skipped-images": 0})})
            replies.append(Message(content, reply_to=message))
        return replies


def test_the_flower_servers_reply_timeout_reaches_the_grid(tmp_path, monkeypatch):
    from lorafair.flower.app import make_server_app

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = tiny_config(tmp_path / "run", "--server.method", "fedit", "--federation.rounds", "2",
                      "--federation.clients_per_round", "2")
    grid, errors = RecordingGrid(), []
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"timeout": 17.5})
    make_server_app(lambda _: cfg, errors)(grid, context)
    assert errors == [] and (tmp_path / "run" / "results.json").is_file()
    assert grid.timeouts == [17.5, 17.5, 17.5]  # the partition query and both rounds
