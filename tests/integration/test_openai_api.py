"""The OpenAI-compatible API against the real server, through the official `openai` client."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"
NUM_TOKENS = 8
LONG_PROMPT = ("Paris is the capital and largest city of France. It is known for the Eiffel Tower, the Louvre "
               "museum, its cafes and its long history as a centre of art, fashion and science. The river that "
               "flows through the city is called the")


def complete(client, model: str, prompt: str = PROMPT, max_tokens: int = NUM_TOKENS, **kwargs) -> str:
    response = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs)
    return response.choices[0].text


def test_models_lists_base_model_and_adapters(client, base_model_name, adapter_names):
    models = {m.id: m for m in client.models.list().data}
    assert base_model_name in models
    assert set(adapter_names) <= set(models)
    for name in adapter_names:
        assert models[name].model_extra["parent"] == base_model_name
    assert models[base_model_name].model_extra["parent"] is None


def test_base_completion(client, base_model_name):
    response = client.completions.create(model=base_model_name, prompt=PROMPT, max_tokens=NUM_TOKENS, temperature=0)
    choice = response.choices[0]
    assert choice.text.strip()
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == NUM_TOKENS
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + NUM_TOKENS
    assert response.model == base_model_name


def test_streamed_completion_equals_unary_and_reports_usage(client, base_model_name):
    unary = complete(client, base_model_name)
    stream = client.completions.create(model=base_model_name, prompt=PROMPT, max_tokens=NUM_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == unary
    assert len([c for c in chunks if c.choices]) >= 2, "tokens must arrive in several chunks"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NUM_TOKENS


def test_chat_completion_streamed_and_unary(client, base_model_name):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    unary = client.chat.completions.create(model=base_model_name, messages=messages, max_tokens=NUM_TOKENS,
                                           temperature=0)
    assert unary.choices[0].message.role == "assistant"
    assert unary.choices[0].message.content
    assert unary.object == "chat.completion"
    stream = client.chat.completions.create(model=base_model_name, messages=messages, max_tokens=NUM_TOKENS,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == unary.usage.prompt_tokens


def test_adapters_change_output_and_match_hf_peft(client, base_model_name, adapter_dir, adapter_names,
                                                  hf_base_model, hf_tokenizer):
    from tests.support.adapters import greedy_tokens, greedy_with_adapter

    base_text = complete(client, base_model_name)
    assert base_text == hf_tokenizer.decode(greedy_tokens(hf_base_model, hf_tokenizer, PROMPT, NUM_TOKENS))
    texts = {}
    for name in adapter_names[:2]:
        texts[name] = complete(client, name)
        expected = greedy_with_adapter(hf_base_model, hf_tokenizer, adapter_dir / name, PROMPT, NUM_TOKENS)
        assert texts[name] == hf_tokenizer.decode(expected), f"{name}: vLLM and HF+peft disagree"
        assert texts[name] != base_text, f"{name} gave the base model's output: adapter not applied"
    first, second = adapter_names[:2]
    assert texts[first] != texts[second]
    # A prompt long enough for the kernels' in-place path (a long run of one slot), not the gathered one.
    assert len(hf_tokenizer(LONG_PROMPT).input_ids) >= 48
    expected = greedy_with_adapter(hf_base_model, hf_tokenizer, adapter_dir / first, LONG_PROMPT, NUM_TOKENS)
    assert complete(client, first, LONG_PROMPT) == hf_tokenizer.decode(expected)


def test_concurrent_requests_across_adapters_all_succeed(server, client, base_model_name, adapter_names):
    models = [base_model_name, *adapter_names]
    prompts = [f"Write one word about the number {i}:" for i in range(len(models))]
    sequential = [complete(client, m, p) for m, p in zip(models, prompts)]

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                      timeout=120) as aclient:
            responses = await asyncio.gather(*[
                aclient.completions.create(model=m, prompt=p, max_tokens=NUM_TOKENS, temperature=0)
                for m, p in zip(models, prompts)])
        return [r.choices[0].text for r in responses]

    concurrent = asyncio.run(run_all())
    # Batched together, every request still ran on its own adapter.
    assert concurrent == sequential
    assert len(set(sequential)) > len(models) // 2


def test_sampling_n_seed_and_stop(client, base_model_name):
    response = client.completions.create(model=base_model_name, prompt="Once upon a time", max_tokens=12,
                                         temperature=1.0, n=3, seed=7)
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    assert 3 <= response.usage.completion_tokens <= 3 * 12  # three choices, each 1..12 tokens
    assert all(c.finish_reason in ("stop", "length") for c in response.choices)
    again = client.completions.create(model=base_model_name, prompt="Once upon a time", max_tokens=12,
                                      temperature=1.0, n=3, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in response.choices]
    full = complete(client, base_model_name, max_tokens=16)
    stop_at = full.strip().split()[1]
    stopped = complete(client, base_model_name, max_tokens=16, stop=[stop_at])
    assert stop_at not in stopped
    assert full.startswith(stopped)


def test_prompt_as_token_ids_and_batch_of_prompts(client, base_model_name, hf_tokenizer):
    ids = hf_tokenizer(PROMPT).input_ids
    assert complete(client, base_model_name, prompt=ids) == complete(client, base_model_name)
    response = client.completions.create(model=base_model_name, prompt=[PROMPT, "Two plus two is"],
                                         max_tokens=4, temperature=0)
    assert [c.index for c in sorted(response.choices, key=lambda c: c.index)] == [0, 1]
    assert response.choices[0].text != response.choices[1].text


def test_logit_bias_forces_a_token_in_its_own_request_only(client, base_model_name, adapter_names, hf_tokenizer):
    """+100 all but forces a token, on the base model and on an adapter, in completions and chat;
    a request without a bias running beside it is unchanged."""
    forced = hf_tokenizer(" banana", add_special_tokens=False).input_ids[0]
    for model in (base_model_name, adapter_names[0]):
        plain = complete(client, model, max_tokens=6)
        with ThreadPoolExecutor(2) as pool:
            biased = pool.submit(complete, client, model, max_tokens=3, logit_bias={str(forced): 100})
            beside = pool.submit(complete, client, model, max_tokens=6)
            assert biased.result() == hf_tokenizer.decode([forced] * 3), model
            assert beside.result() == plain, "another request's bias reached this one"
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                              temperature=0, logit_bias={str(forced): 100})
        assert chat.choices[0].message.content == hf_tokenizer.decode([forced] * 2)


def test_vllm_sampling_extensions_keep_only_the_likeliest_token(client, adapter_names):
    """vLLM's top_k = 1 or min_p = 1 leave the most likely token alone: sampling is greedy."""
    model = adapter_names[0]
    greedy = complete(client, model, max_tokens=6)
    for extension in ({"top_k": 1}, {"min_p": 1.0}):
        sampled = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3,
                                            extra_body=extension)
        assert sampled.choices[0].text == greedy, extension


@pytest.mark.parametrize("kwargs, param", [
    ({"extra_body": {"top_k": -5}}, "top_k"),
    ({"extra_body": {"min_tokens": 5}}, "min_tokens"),  # more than max_tokens
    ({"extra_body": {"stop_token_ids": [10**6]}}, "stop_token_ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"extra_body": {"best_of": 3}}, "best_of"),  # not served: refused by name, never ignored
    ({"temperature": 5.0}, "temperature"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"n": 1000}, "n"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["x"] * 50}, "stop"),
    ({"logprobs": 21}, "logprobs"),  # supported, bounded at 20
])
def test_invalid_parameters_are_400_naming_the_parameter(client, base_model_name, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=base_model_name, prompt=PROMPT, **{"max_tokens": 4, **kwargs})
    assert info.value.status_code == 400
    assert param in info.value.message
    assert info.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_404_and_others_keep_working(client, base_model_name, adapter_names):
    with pytest.raises(openai.NotFoundError) as info:
        complete(client, "no-such-adapter")
    assert "no-such-adapter" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "hi"}])
    assert complete(client, adapter_names[0])


def test_malformed_requests_get_openai_error_shape(server, base_model_name):
    bad_json = httpx.post(f"{server.url}/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    assert "error" in bad_json.json()
    missing = httpx.post(f"{server.url}/v1/chat/completions", json={"model": base_model_name})
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "messages"
    too_long = httpx.post(f"{server.url}/v1/completions",
                          json={"model": base_model_name, "prompt": "word " * 5000, "max_tokens": 4})
    assert too_long.status_code == 400
    assert "context" in too_long.json()["error"]["message"]
    huge = httpx.post(f"{server.url}/v1/completions", content=b"x" * (2 << 20),
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_request_id_is_echoed(server, base_model_name):
    response = httpx.post(f"{server.url}/v1/completions", headers={"x-request-id": "abc-123"},
                          json={"model": base_model_name, "prompt": PROMPT, "max_tokens": 2})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "abc-123"
    assert response.json()["id"] == "abc-123"


def test_client_going_away_aborts_the_engine_request(server, base_model_name):
    from .conftest import wait_until_engine_idle

    body = {"model": base_model_name, "prompt": PROMPT, "max_tokens": 900, "ignore_eos": True}
    # Non-streamed: the client gives up waiting for the whole answer.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", timeout=1.0, json=body)
    # 900 tokens take over a minute here; an aborted request leaves the engine within seconds.
    assert wait_until_engine_idle(server, timeout=15) == 0
    # Streamed: the client closes the connection after the first event.
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    assert wait_until_engine_idle(server, timeout=15) == 0
