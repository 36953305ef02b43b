"""loraplex load tester: open-loop load across many adapters against any OpenAI-compatible server."""
