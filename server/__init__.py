"""loraplex gateway: one process, one vLLM engine, OpenAI-compatible HTTP (and gRPC) front doors."""
