"""/v1/chat/completions as a completion of the prompt the chat template renders; adapter runs served."""

import json

import pytest

from llmcli.load import load_checkpoint


def test_chat_uses_the_template(server, client, complete):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak"}]
    chat = client.chat.completions.create(model=server.model, messages=messages, max_tokens=30, temperature=0)
    prompt = "system: Be brief.\nuser: Speak\nassistant:"
    plain = complete(client, prompt, max_tokens=30, stop=["\nuser:"])
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(prompt)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Sp"}, {"type": "text", "text": "eak"}]}]
    again = client.chat.completions.create(model=server.model, messages=parts, max_tokens=30, temperature=0)
    alone = client.chat.completions.create(model=server.model, messages=messages[1:], max_tokens=30,
                                           temperature=0)
    assert again.choices[0].message.content == alone.choices[0].message.content


@pytest.mark.slow
def test_an_adapter_run_is_served(lora_run, start_server, cli):
    loaded = load_checkpoint(lora_run)
    model, tokenizer = loaded.model, loaded.tokenizer
    server = start_server(model, tokenizer)
    reply = server.client().chat.completions.create(model=server.model, max_tokens=12, temperature=0,
                                                    messages=[{"role": "user", "content": "say fox"}])
    alone = cli("generate", lora_run, "user: say fox\nassistant:", "-n", "12", "--temperature", "0", "--json",
                "--stop", "\\nuser:")
    assert reply.choices[0].message.content == json.loads(alone.stdout)["completion"]
