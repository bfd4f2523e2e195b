"""The training-loop client: logging never waits on the network.

    from trackhouse import Client

    with Client("127.0.0.1:50051") as client:
        run = client.start_run(experiment="sweep-42", params={"lr": 3e-4})
        run.log_metrics({"loss": 0.3}, step=1)    # appends to a buffer and returns
        run.finish()
    # leaving the block waits until every point is acknowledged, or raises

api.py is what the caller touches (Client, Run, config, stats); buffers.py holds
the columnar buffers and shapes them into requests that fit the server;
transport.py sends them (one gRPC stream, or a Kafka producer) and decides what
is retried. Only grpcio, protobuf and numpy are needed: this package is the
light `pip install trackhouse`.
"""

from trackhouse.ingest.client.api import BufferFullError, Client, ClientConfig, ClientStats, Run

__all__ = ["BufferFullError", "Client", "ClientConfig", "ClientStats", "Run"]
