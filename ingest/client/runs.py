"""The client's two blocking calls to the server's `trackhouse.v1.Runs` service: resume and fork.

They are rare (once per job start), so each opens a short-lived channel of its own beside the
streaming one, with the same address, TLS and credentials. A refusal raises InvalidArgumentError
(a bad or unknown run), anything else IngestError.
"""

from __future__ import annotations

from typing import TypeVar

import grpc
from google.protobuf.message import Message

from trackhouse.ingest.client.transport import GrpcSession, KafkaSession
from trackhouse.ingest.errors import IngestError, InvalidArgumentError
from trackhouse.v1 import runs_pb2

#: The run's current attempt, as a tag the server sets on resume, for clients that only read runs (the
#: trackhouse:// plugin attaches with it); absent: 0.
ATTEMPT_TAG = "trackhouse.attempt"
_SERVICE = "/trackhouse.v1.Runs/"
_TIMEOUT_S = 30.0
R = TypeVar("R", bound=Message)


def resume_run(session: GrpcSession | KafkaSession, run_id: str) -> runs_pb2.ResumeRunReply:
    return _call(session, "ResumeRun", runs_pb2.ResumeRunRequest(run_id=run_id), runs_pb2.ResumeRunReply)


def fork_run(
    session: GrpcSession | KafkaSession, parent_run_id: str, fork_step: int, name: str, run_id: str
) -> runs_pb2.ForkRunReply:
    request = runs_pb2.ForkRunRequest(parent_run_id=parent_run_id, fork_step=fork_step, name=name, run_id=run_id)
    return _call(session, "ForkRun", request, runs_pb2.ForkRunReply)


def _call(session: GrpcSession | KafkaSession, method: str, request: Message, reply: type[R]) -> R:
    if not isinstance(session, GrpcSession):
        raise IngestError(
            f"{method} needs the server itself (it numbers attempts and knows runs), not Kafka: call"
            " /api/2.0/trackhouse/runs/resume or runs/fork over HTTP, then attach_run(run_id, attempt=...)"
        )
    address = session.target.address
    channel = grpc.secure_channel(address, session.tls) if session.tls else grpc.insecure_channel(address)
    with channel:
        call = channel.unary_unary(
            _SERVICE + method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply.FromString,
        )
        try:
            answer: R = call(request, timeout=_TIMEOUT_S, metadata=session.credentials.metadata)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                raise InvalidArgumentError(f"{method}: {details}") from None
            raise IngestError(f"{method} failed: {code.name}: {details}") from None
        return answer
