"""Chat templates: the file format, and /v1/chat/completions as a completion of the rendered prompt."""

import json

import pytest

from llmcli.errors import UserError
from llmcli.serve.chat import ChatTemplate, load_chat_template


def test_chat_template_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"prefix": "<chat>\n", "message": "<{role}> {content}\n",
                                "roles": {"system": "[{content}]\n"}, "generation_prompt": "<assistant>",
                                "stop": ["<user>"]}))
    template = load_chat_template(path)
    assert template.render([("system", "x"), ("user", "a {b}")]) == "<chat>\n[x]\n<user> a {b}\n<assistant>"
    assert template.stop == ("<user>",)
    assert ChatTemplate().render([("user", "hi")]) == "user: hi\nassistant:"
    for content, message in [({"message": "{name}"}, "unknown field {name}"), ({"mesage": "x"}, "unknown key"),
                             ({"message": "{role"}, "literal braces"), ({"stop": [""]}, "non-empty")]:
        path.write_text(json.dumps(content))
        with pytest.raises(UserError, match=message):
            load_chat_template(path)


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
