"""serve --draft / --prompt-lookup: greedy text equals the plain server's, streaming and the openai
client work unchanged, a repetition penalty is a 400, /metrics counts the guesses, bad inputs fail
in one line."""

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from llmcli.checkpoint import write_checkpoint  # noqa: E402
from llmcli.config import Config, ModelConfig  # noqa: E402
from llmcli.generate.speculator import Speculation  # noqa: E402
from llmcli.load import load_checkpoint  # noqa: E402
from llmcli.models.transformer import Transformer  # noqa: E402

# The last two are longer than the context (64) or grow past it: the slot slides.
PROMPTS = ["ROMEO:", "All: Speak, speak", "speak. " * 12, "Before we proceed " * 2]
MODES = ("prompt lookup", "draft")
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def draft_dir(checkpoint, loaded):
    """A smaller random model (1 x 16, context 48) with the served checkpoint's tokenizer."""
    torch.manual_seed(3)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=48,
                                    vocab_size=loaded[1].get_vocab_size())).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    directory = checkpoint.parent / "draft"
    write_checkpoint(directory, model, Config(model=model.config), (checkpoint / "tokenizer.json").read_bytes(),
                     {"step": 1})
    return directory


@pytest.fixture(scope="module")
def speculations(draft_dir):
    draft = load_checkpoint(draft_dir).model
    return {"prompt lookup": Speculation(tokens=3, lookup=2), "draft": Speculation(tokens=4, draft=draft)}


def scrape(server) -> dict[str, float]:
    """{sample name: value} of the unlabelled samples of one GET /metrics."""
    text = server.get("/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


@pytest.mark.parametrize("mode", MODES)
def test_greedy_text_equals_the_plain_servers(mode, speculations, start_server, client, complete):
    spec = start_server(speculation=speculations[mode], max_batch_size=4)
    spec_client = spec.client()
    lengths = [40, 40, 30, 100]  # the last grows past the context
    want = [complete(client, p, max_tokens=n, extra_body=IGNORE_EOS).choices[0].text
            for p, n in zip(PROMPTS, lengths, strict=True)]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # several sequences at once: each runs its own rounds
        got = list(pool.map(lambda pn: complete(spec_client, pn[0], max_tokens=pn[1], extra_body=IGNORE_EOS),
                            zip(PROMPTS, lengths, strict=True)))
    assert [g.choices[0].text for g in got] == want
    assert [g.usage.completion_tokens for g in got] == lengths
    samples = scrape(spec)
    assert samples["llmcli_speculative_proposed_tokens_total"] > 0
    assert samples["llmcli_speculative_accepted_tokens_total"] > 0  # some guesses were kept (and rolled back)
    assert samples["llmcli_generation_tokens_total"] == sum(lengths)


@pytest.mark.parametrize("mode", MODES)
def test_streaming_and_chat_through_the_openai_client(mode, speculations, start_server, server, complete):
    spec = start_server(speculation=speculations[mode])
    spec_client = spec.client()
    chunks = list(complete(spec_client, "ROMEO:", max_tokens=40, stream=True, extra_body=IGNORE_EOS,
                           stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == complete(server.client(), "ROMEO:", max_tokens=40, extra_body=IGNORE_EOS).choices[0].text
    assert chunks[-1].usage.completion_tokens == 40 and len(text) == 40

    messages = [{"role": "user", "content": "Speak"}]
    args = dict(model=spec.model, messages=messages, max_tokens=30, temperature=0)
    whole = server.client().chat.completions.create(**args).choices[0].message.content
    assert spec_client.chat.completions.create(**args).choices[0].message.content == whole
    stream = spec_client.chat.completions.create(**args, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole
    spec.wait_idle()


def test_a_repetition_penalty_is_a_400_naming_it(speculations, start_server, error_of):
    spec = start_server(speculation=speculations["prompt lookup"])
    for stream in (False, True):
        response = spec.post("/v1/completions", {"prompt": "ROMEO:", "repetition_penalty": 1.3, "stream": stream})
        assert response.status_code == 400
        error = error_of(response)
        assert error["param"] == "repetition_penalty" and "decodes speculatively" in error["message"]
    with pytest.raises(openai.BadRequestError, match="repetition penalty"):
        spec.client().chat.completions.create(model=spec.model, messages=[{"role": "user", "content": "Speak"}],
                                              extra_body={"repetition_penalty": 1.2})
    assert spec.post("/v1/completions", {"prompt": "ROMEO:", "repetition_penalty": 1.0, "max_tokens": 40,
                                         **IGNORE_EOS}).status_code == 200
    samples = scrape(spec)
    assert samples["llmcli_speculative_acceptance_ratio"] == pytest.approx(
        samples["llmcli_speculative_accepted_tokens_total"] / samples["llmcli_speculative_proposed_tokens_total"])
    assert "llmcli_speculative_proposed_tokens_total" not in scrape(start_server())  # a plain server has none
    spec.wait_idle()


def test_cli_one_line_errors(checkpoint, draft_dir, tmp_path, cli, one_line_error, tiny_model, tiny_recurrent,
                             write_run, char_tokenizer):
    vocab = char_tokenizer.get_vocab_size()
    other = write_run(tmp_path / "other", tiny_model(vocab), char_tokenizer)  # another tokenizer
    lstm = write_run(tmp_path / "lstm", tiny_recurrent("lstm", vocab), char_tokenizer)
    cases = [
        ((checkpoint, "--draft", other), "its tokenizer differs"),
        ((checkpoint, "--draft", draft_dir, "--prompt-lookup", "2"), "give one"),
        ((checkpoint, "--prompt-lookup", "2", "--engine", "vllm"), "vllm speculates with its own options"),
        ((checkpoint, "--prompt-lookup", "2", "--draft-tokens", "0"), "--draft-tokens must be at least 1"),
        ((lstm, "--prompt-lookup", "2"), "cannot be rolled back"),
        ((other, "--draft", lstm), "the draft (model.arch=lstm)"),
    ]
    for args, message in cases:
        one_line_error(cli("serve", *args, "--port", "0"), message, alone=True)


@pytest.mark.slow
def test_the_command_serves_speculatively(checkpoint, draft_dir, serve_process, server, complete):
    proc, url, log_path = serve_process(checkpoint, "--draft", draft_dir, "--draft-tokens", "3",
                                        env={"LLMCLI_API_KEY": None})
    assert f"speculative decoding on: draft {draft_dir} proposes 3 tokens" in log_path.read_text()
    remote = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20)
    got = complete(remote, "ROMEO:", max_tokens=30).choices[0].text  # the model's name: checkpoint.name
    assert got == complete(server.client(), "ROMEO:", max_tokens=30).choices[0].text
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0
