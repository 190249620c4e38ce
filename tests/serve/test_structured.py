"""The OpenAI API as clients use it today: response_format (both shapes), tools and tool_choice,
embeddings, several adapters on one base, and every bad input a 400 naming its field while the
server keeps serving."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from llmcli.checkpoint import BASE, base_pointer, write_checkpoint
from llmcli.config import Config, LoraConfig
from llmcli.load import load_checkpoint
from llmcli.lora import add_adapter
from tests.conftest import json_valid

TEXT = ('{"name": "ROMEO", "age": 17, "city": "Verona", "mood": "sad"}\nuser: assistant: tool: tools: '
        "<tool_call></tool_call> 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ ,.:;!?-_'\"{}[]\n")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string", "maxLength": 8}},
                                                           "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
BLOCK = 256


@pytest.fixture(scope="module")
def json_checkpoint(tmp_path_factory, make_char_checkpoint):
    """A random transformer whose char vocabulary spells JSON and tool calls."""
    return make_char_checkpoint(tmp_path_factory.mktemp("structured") / "json", TEXT, BLOCK, std=0.3)


@pytest.fixture(scope="module")
def json_server(json_checkpoint, running_class):
    loaded = load_checkpoint(json_checkpoint, torch.device("cpu"), torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    running = running_class(model, tokenizer, max_batch_size=4)
    yield running
    running.stop()


def chat(client, **kwargs):
    kwargs.setdefault("messages", [{"role": "user", "content": "Who is ROMEO?"}])
    kwargs.setdefault("max_tokens", 200)
    return client.chat.completions.create(model="tiny", **kwargs)


def test_response_format_both_shapes(json_server):
    client = json_server.client()
    obj = chat(client, response_format={"type": "json_object"}, n=2, seed=1)
    for choice in obj.choices:
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
    shaped = chat(client, response_format={"type": "json_schema", "json_schema": {
        "name": "person", "schema": SCHEMA, "strict": True}}, n=3, seed=2)
    assert all(json_valid(c.message.content, SCHEMA) for c in shaped.choices)
    assert all(c.finish_reason == "stop" for c in shaped.choices)
    streamed = chat(client, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
                    stream=True, seed=3)
    assert json_valid("".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices), SCHEMA)
    completion = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=100, seed=4,
                                           extra_body={"response_format": {"type": "regex", "regex": "[a-z]{3,6}!"}})
    assert completion.choices[0].text.endswith("!") and len(completion.choices[0].text) <= 7


def test_tool_choice_required_and_named_always_validate(json_server):
    client = json_server.client()
    reply = chat(client, tools=[WEATHER, TIME], tool_choice="required", n=3, seed=5)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
        assert json_valid(call.function.arguments, schema)
    named = chat(client, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 seed=6)
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"

    stream = chat(client, tools=[WEATHER], tool_choice="required", stream=True, seed=7)
    calls, reasons = {}, []
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": None, "arguments": ""})
                entry["name"] = entry["name"] or (delta.function.name if delta.function else None)
                entry["arguments"] += (delta.function.arguments or "") if delta.function else ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["tool_calls"] and calls[0]["name"] == "get_weather"
    assert json_valid(calls[0]["arguments"], WEATHER["function"]["parameters"])


def test_tool_results_go_back_through_the_template_and_none_renders_no_tools(json_server):
    client = json_server.client()
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                      "arguments": '{"city": "Verona"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = chat(client, messages=messages, tools=[WEATHER], tool_choice="auto", max_tokens=20, seed=8)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt_tokens = reply.usage.prompt_tokens
    none = chat(client, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=5, seed=8)
    assert none.usage.prompt_tokens < prompt_tokens  # no tools line
    assert none.choices[0].message.tool_calls is None
    rendered = json_server.state.template.render(messages, tools=[WEATHER])
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Verona"}}</tool_call>' in rendered
    assert "tool: sunny\n" in rendered and rendered.startswith("tools: [")


def test_embeddings(json_server):
    client = json_server.client()
    got = client.embeddings.create(model="tiny", input=["ROMEO", "JULIET loves ROMEO"])  # base64 by default
    vectors = np.array([d.embedding for d in got.data])
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    floats = json_server.post("/v1/embeddings", {"input": "ROMEO", "encoding_format": "float"}).json()
    assert np.allclose(floats["data"][0]["embedding"], vectors[0], atol=1e-6)
    raw = json_server.post("/v1/embeddings", {"input": [[5, 6, 7]], "encoding_format": "base64"}).json()
    assert np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4").shape == (32,)
    assert got.usage.prompt_tokens == len("ROMEO") + len("JULIET loves ROMEO")
    same = client.embeddings.create(model="tiny", input="ROMEO", dimensions=32)
    assert np.allclose(same.data[0].embedding, vectors[0], atol=1e-6)


BAD = [
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}, "strict": True}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema"),
    ("/v1/chat/completions", {"response_format": {"type": "regex", "regex": "(unclosed"}}, "response_format"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools.0.function.name"),
    ("/v1/chat/completions", {"tools": [{"type": "code_interpreter"}]}, "tools.0"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array"}}}]}, "tools.0.function.parameters"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required", "response_format": {
        "type": "json_object"}}, "response_format"),
    ("/v1/embeddings", {"input": "ROMEO " * 300}, "input"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": "ROMEO", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "ROMEO", "dimensions": 8}, "dimensions"),
    ("/v1/embeddings", {"input": [[999]]}, "input"),
]


@pytest.mark.parametrize(("path", "fields", "param"), BAD, ids=[b[2] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_field(json_server, error_of, path, fields, param):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **fields} if "chat" in path else fields
    response = json_server.post(path, body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and "\n" not in error["message"], error
    assert json_server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 3}).status_code == 200


def test_a_vocabulary_that_cannot_spell_json_is_refused(server, error_of):
    """The serve fixtures' char vocabulary has no `{`."""
    response = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "response_format": {"type": "json_object"}})
    error = error_of(response)
    assert response.status_code == 400 and error["param"] == "response_format"
    assert "has no token for '{'" in error["message"]


# -- real processes ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_openai_client_against_llmcli_serve(serve_process, json_checkpoint):
    import openai

    _, url, _ = serve_process(json_checkpoint, "--model-name", "tiny")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    shaped = chat(client, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
                  seed=1)
    assert json_valid(shaped.choices[0].message.content, SCHEMA)
    assert isinstance(json.loads(chat(client, response_format={"type": "json_object"}, seed=2)
                                 .choices[0].message.content), dict)
    called = chat(client, tools=[WEATHER], tool_choice="required", seed=3)
    assert json_valid(called.choices[0].message.tool_calls[0].function.arguments, WEATHER["function"]["parameters"])
    streamed = [c for c in chat(client, tools=[WEATHER], tool_choice="required", stream=True, seed=3) if c.choices]
    arguments = "".join(d.function.arguments or "" for c in streamed for d in c.choices[0].delta.tool_calls or [])
    assert arguments == called.choices[0].message.tool_calls[0].function.arguments  # same seed, same call
    vectors = client.embeddings.create(model="tiny", input=["ROMEO", "Verona"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 32


def write_adapter(base, directory, seed: int, targets: list[str]):
    """An adapter run of `base` with random (non-zero) LoRA weights, as training would leave it."""
    model = load_checkpoint(base, torch.device("cpu"), torch.float32).model
    add_adapter(model, LoraConfig(r=4, alpha=8, targets=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    write_checkpoint(directory, model, Config(model=model.config), (base / "tokenizer.json").read_bytes(),
                     {"step": 1}, files={BASE: base_pointer(base)})
    return directory


@pytest.mark.slow
def test_each_adapter_answers_as_a_server_of_that_merged_adapter(serve_process, json_checkpoint, tmp_path):
    import openai

    adapters = {"first": write_adapter(json_checkpoint, tmp_path / "first", 1, ["q", "v"]),
                "second": write_adapter(json_checkpoint, tmp_path / "second", 2, ["up", "down"])}
    _, url, _ = serve_process(json_checkpoint, "--model-name", "tiny", *(
        arg for name, run in adapters.items() for arg in ("--adapter", f"{name}={run}")))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny", "first", "second"]
    prompts = ["ROMEO:", "Verona, 17", "sad ROMEO"]

    def answers(client, model):
        return [client.completions.create(model=model, prompt=p, max_tokens=24, temperature=0).choices[0].text
                for p in prompts]

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # requests for different adapters share batches
        futures = {name: pool.submit(answers, client, name) for name in ("tiny", "first", "second")}
        mixed = {name: f.result() for name, f in futures.items()}
    assert len({tuple(v) for v in mixed.values()}) == 3  # the adapters change the answers
    for name, run in {"tiny": json_checkpoint, **adapters}.items():
        _, alone_url, _ = serve_process(run, "--model-name", name)
        alone = openai.OpenAI(base_url=alone_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert answers(alone, name) == mixed[name], name
    response = client.with_options(max_retries=0).completions.with_raw_response
    with pytest.raises(openai.NotFoundError, match="third"):
        response.create(model="third", prompt="x", max_tokens=2)
