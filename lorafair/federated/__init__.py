"""The federated job: the client and server roles, the transport between ranks, the round loop, checkpoints and
resume."""
