"""Sends one streamed generation over loraplex's gRPC API and measures it like the HTTP client."""

from __future__ import annotations

import time

import grpc

from .client import RequestResult
from .workload import RequestSpec


async def send_grpc(channel: grpc.aio.Channel, spec: RequestSpec, sent_at: float, timeout_s: float,
                    metadata: tuple = ()) -> RequestResult:
    from loraplex.server.grpc_gen import loraplex_pb2 as pb
    from loraplex.server.grpc_gen import loraplex_pb2_grpc as pb_grpc

    result = RequestResult(spec.index, spec.model, sent_at)
    request = pb.GenerateRequest(model=spec.model, text=spec.prompt,
                                 sampling=pb.SamplingParameters(max_tokens=spec.max_tokens, temperature=0.0))
    start = last = time.perf_counter()
    try:
        async for message in pb_grpc.GenerationStub(channel).GenerateStream(request, timeout=timeout_s,
                                                                           metadata=metadata):
            if message.token_ids:
                last = result.output_arrived(time.perf_counter(), start, last)
            if message.HasField("usage"):
                result.prompt_tokens = message.usage.prompt_tokens
                result.output_tokens = message.usage.completion_tokens
        result.e2e_s = time.perf_counter() - start
        result.ok = True
    except grpc.aio.AioRpcError as exc:
        result.error = f"grpc_{exc.code().name.lower()}"
    return result
