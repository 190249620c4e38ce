"""The wire format's errors: 400 bodies naming the field, 404 and 413, through a running server;
and the SamplingParams a body becomes."""

import pytest

openai = pytest.importorskip("openai")

from llmcli.serve.protocol import APIError, CompletionBody, sampling_params  # noqa: E402


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": "a", "temperature": -1}, "temperature", "greater than or equal to 0"),
    ({"prompt": "a", "top_p": 0}, "top_p", "greater than 0"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "a", "n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": "a", "stop": [""]}, "stop", "cannot be empty"),
    ({"prompt": "a", "seed": -3}, "seed", "greater than or equal to 0"),
    ({"prompt": "a", "top_k": "many"}, "top_k", "valid integer"),
    ({"prompt": 5}, "prompt", "must be a string"),
    ({}, "prompt", "Field required"),
    ({"prompt": "Zebra 42"}, "prompt", "never saw: '2' '4' 'Z'"),
    ({"prompt": [[9999]]}, "prompt", "outside the vocabulary"),
    ({"prompt": "a", "logprobs": 2}, "logprobs", "not supported"),
    ({"prompt": "a", "n": 100}, "n", "at most 68"),
])
def test_invalid_parameters_are_400_naming_the_field(server, error_of, body, param, words):
    response = server.post("/v1/completions", body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_bodies_and_chat_fields_are_400(server, error_of):
    for body in (b"{not json", b"[1, 2]", b""):
        response = server.post("/v1/completions", body)
        assert response.status_code == 400 and "JSON" in error_of(response)["message"]
    response = server.post("/v1/chat/completions", {"messages": []})
    assert response.status_code == 400 and error_of(response)["param"] == "messages"
    response = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]})
    assert response.status_code == 400 and error_of(response)["param"].startswith("messages.0.content")
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    response = server.post("/v1/chat/completions", {"messages": [image]})
    assert response.status_code == 400 and "only text" in error_of(response)["message"]


def test_unknown_model_and_route_are_404(server, client, error_of):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="a")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    response = server.get("/v1/nope")
    assert response.status_code == 404 and "no route" in error_of(response)["message"]


def test_bodies_over_a_mebibyte_are_413(server, complete, error_of):
    big = {"prompt": "a" * (1 << 20)}
    response = server.post("/v1/completions", big)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the size is counted as the body streams in
        for _ in range(20):
            yield b" " * 65536

    response = server.post("/v1/completions", chunked())
    assert response.status_code == 413
    assert complete(server.client(), "ROMEO:", max_tokens=3).choices[0].text  # still serving


def test_sampling_params_from_a_body():
    body = CompletionBody(prompt="a", max_tokens=7, temperature=0, top_k=-1, stop="x", seed=3, ignore_eos=True)
    params = sampling_params(body, body.max_tokens, extra_stop=("y", "x"))
    assert (params.max_new_tokens, params.temperature, params.top_k, params.top_p) == (7, 0, 0, 1.0)
    assert params.stop == ("x", "y") and params.seed == 3 and params.ignore_eot


@pytest.mark.parametrize("fields,param", [
    ({"max_tokens": 0}, "max_tokens"),  # SamplingParams says max_new_tokens
    ({"temperature": float("nan")}, "temperature"),
    ({"seed": 2**63}, "seed"),
])
def test_values_sampling_params_refuse_are_400_in_the_body_terms(fields, param):
    # Bodies built without pydantic's checks: what would reach SamplingParams if the body's own
    # constraints missed a case.
    body = CompletionBody.model_construct(**{**CompletionBody(prompt="a").model_dump(), **fields})
    with pytest.raises(APIError) as info:
        sampling_params(body, fields.get("max_tokens", 16))
    error = info.value
    assert error.status == 400 and error.param == param and error.message.startswith(f"{param} must be")
    assert "max_new_tokens" not in error.message


@pytest.mark.parametrize("body", [
    b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"prompt": "a", "extra": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",
])
def test_a_deeply_nested_body_is_400_not_500(server, error_of, body):
    response = server.post("/v1/completions", body)
    assert response.status_code == 400 and "nested too deeply" in error_of(response)["message"]


@pytest.mark.parametrize("field,value", [("stream", "yes"), ("echo", 1), ("ignore_eos", "true"), ("n", 2.0),
                                         ("max_tokens", "5"), ("temperature", "0.5"), ("seed", True)])
def test_openai_fields_have_strict_types(server, error_of, field, value):
    response = server.post("/v1/completions", {"prompt": "a", field: value})
    assert response.status_code == 400 and error_of(response)["param"] == field


def test_a_wrong_method_is_405_with_allow(server):
    response = server.get("/v1/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"


def test_the_openapi_schema_and_docs_are_served_without_a_key(start_server):
    running = start_server(api_key="secret")
    schema = running.get("/openapi.json")
    assert schema.status_code == 200
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(schema.json()["paths"])
    body = schema.json()["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"].endswith("/ChatBody")
    assert "messages" in schema.json()["components"]["schemas"]["ChatBody"]["properties"]
    assert running.get("/docs").status_code == 200
    assert running.post("/v1/completions", {"prompt": "a"}).status_code == 401
