"""``moss-rlhf serve``: the official ``openai`` client against a real uvicorn server on a free local port —
models, chat and text completions, streaming, n, stop, max_tokens, usage, and clear errors."""

from __future__ import annotations

import threading
import time

import pytest

from moss_rlhf.assistant import Assistant
from moss_rlhf.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    import uvicorn

    from tests.conftest import free_port

    assistant = Assistant.from_pretrained(str(tiny_model_dir), device="cpu")
    port = free_port()
    config = uvicorn.Config(create_app(assistant, "tiny", max_tokens_limit=32), host="127.0.0.1", port=port,
                            log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", assistant
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=60)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_completion_with_n_and_usage(client, server):
    _, assistant = server
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "Where did Lin go?"}]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, n=3, temperature=1.0,
                                              seed=1)
    assert response.object == "chat.completion" and len(response.choices) == 3
    assert [c.index for c in response.choices] == [0, 1, 2]
    for choice in response.choices:
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    prompt_tokens = len(assistant.encode(messages))
    assert response.usage.prompt_tokens == prompt_tokens
    assert 3 <= response.usage.completion_tokens <= 18
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, n=3, temperature=1.0, seed=1)
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]


def test_greedy_chat_matches_the_python_api(client, server):
    _, assistant = server
    response = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=10, temperature=0)
    assert response.choices[0].message.content == assistant.respond("Hello", temperature=0.0, max_new_tokens=10)


def test_streamed_chat_equals_the_whole_reply(client):
    # sampled, not greedy: the untrained model's greedy reply repeats half of a UTF-8 character, which (rightly)
    # streams as a single piece at the end. The first seed whose reply runs to the length limit gives a long one.
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Where did Bo go?"}], max_tokens=12,
                  temperature=1.0)
    for seed in range(10):
        response = client.chat.completions.create(seed=seed, **kwargs)
        if response.choices[0].finish_reason == "length":
            break
    whole = response.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, seed=seed,
                                                 **kwargs))
    *text_chunks, usage_chunk = chunks
    assert text_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks) == whole
    assert text_chunks[-1].choices[0].finish_reason == response.choices[0].finish_reason
    assert sum(1 for c in text_chunks if c.choices[0].delta.content) >= 2
    assert usage_chunk.choices == [] and usage_chunk.usage == response.usage


def test_text_completion_stop_and_length(client, server):
    _, assistant = server
    response = client.completions.create(model="tiny", prompt="Lin went to", max_tokens=10, temperature=0)
    text = response.choices[0].text
    assert text == assistant.generate("Lin went to", temperature=0.0, max_new_tokens=10)
    assert response.usage.completion_tokens <= 10
    if len(text) > 2:
        stop = text[1:3]
        cut = client.completions.create(model="tiny", prompt="Lin went to", max_tokens=10, temperature=0, stop=[stop])
        assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    many = client.completions.create(model="tiny", prompt=["Lin", "Bo went"], max_tokens=4, temperature=0)
    assert len(many.choices) == 2
    limited = client.completions.create(model="tiny", prompt="Lin", max_tokens=500, temperature=1.0)
    assert limited.usage.completion_tokens <= 32  # the server's --max-tokens-limit


def test_streamed_text_completion(client):
    kwargs = dict(model="tiny", prompt="Bo said", max_tokens=8, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole


def test_errors_are_clear(client, server):
    import httpx
    import openai

    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError, match=r"messages\[0\].role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])
    raw = httpx.post(f"{server[0]}/chat/completions", json={"model": "tiny", "messages": [], "max_tokens": 2})
    assert raw.status_code == 422 and raw.json()["error"]["param"] == "messages"
    raw = httpx.post(f"{server[0]}/completions", json={"model": "tiny", "prompt": "x", "temperature": 5})
    assert raw.status_code == 422 and "temperature" in raw.json()["error"]["message"]
    raw = httpx.post(f"{server[0]}/chat/completions", content=b'{"model": "tiny", messages',
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON (character 18: Expecting property name" in raw.json()["error"]["message"]


def test_what_cannot_be_honoured_is_refused_before_sampling(client, server):
    """A prompt that leaves no room for max_tokens in the context is OpenAI's 400, streamed or not; a field the
    server cannot honour is refused when it asks for something and accepted at the value that asks for nothing."""
    import httpx
    import openai

    long = "where " * 600  # more tokens than the tiny model's 512 positions
    with pytest.raises(openai.BadRequestError, match="context is 512 tokens; the prompt has"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}], max_tokens=4)
    for stream in (False, True):
        raw = httpx.post(f"{server[0]}/completions", json={"model": "tiny", "prompt": ["hi", long], "max_tokens": 4,
                                                            "stream": stream})
        assert raw.status_code == 400 and raw.json()["error"]["message"].startswith("prompt[1]: this model's context")
    with pytest.raises(openai.UnprocessableEntityError, match="logprobs: not supported"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], logprobs=True)
    with pytest.raises(openai.UnprocessableEntityError, match="presence_penalty: not supported"):
        client.completions.create(model="tiny", prompt="hi", presence_penalty=0.5)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           presence_penalty=0, logprobs=False, user="someone")
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_config_checks(tmp_path, capsys):
    from moss_rlhf.cli import main
    from moss_rlhf.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="--port must be between 1 and 65535"):
        from_dict(ServeConfig, {"port": 0})
    assert main(["serve", str(tmp_path / "none")]) == 2  # checked when the server starts, not in the config
    assert "does not exist" in capsys.readouterr().err
    assert ServeConfig().host == "127.0.0.1"
