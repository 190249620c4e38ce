"""Chat templates: Jinja ones render exactly as transformers' apply_chat_template, the JSON layout file,
the default layout in both forms, and errors as one line."""

from __future__ import annotations

import json

import pytest

from llmcli.chat_template import DEFAULT_JINJA, ChatTemplate, JinjaTemplate, load_chat_template
from llmcli.errors import UserError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
          "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
COUNTING = ("{%- set ns = namespace(n=0) -%}\n{%- for m in messages -%}\n  {%- set ns.n = ns.n + 1 -%}\n"
            "  {{ ns.n }}: {{ m | tojson }};\n  {% if loop.last %}{% break %}{% endif %}\n{%- endfor -%}\n"
            "{%- if add_generation_prompt %}>{% endif %}")
MESSAGES = [("system", "Be brief."), ("user", " Who art thou? "), ("assistant", "A friend. "), ("user", "Ünïcode \"quotes\"")]


@pytest.mark.parametrize("template", [CHATML, LLAMA2, ZEPHYR, COUNTING, DEFAULT_JINJA],
                         ids=["chatml", "llama2", "zephyr", "namespace-tojson", "default"])
@pytest.mark.parametrize("generation", [True, False])
def test_jinja_equals_transformers(template, generation, llama_tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=llama_tokenizer, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>", chat_template=template)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    for messages in (MESSAGES, MESSAGES[1:2], MESSAGES[1:3]):
        theirs = hf.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                        add_generation_prompt=generation)
        assert JinjaTemplate(template, specials).render(messages, generation) == theirs


def test_default_layout_in_both_forms():
    for messages in (MESSAGES, MESSAGES[1:2]):
        for generation in (True, False):
            assert JinjaTemplate(DEFAULT_JINJA).render(messages, generation) == \
                ChatTemplate().render(messages, generation)
    assert ChatTemplate().render([("user", "hi")]) == "user: hi\nassistant:"


def test_where_a_template_comes_from(tmp_path):
    assert isinstance(load_chat_template(None, tmp_path), ChatTemplate)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "</s>"}))
    assert load_chat_template(None, tmp_path).source == CHATML
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": LLAMA2}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named, "bos_token": {"content": "<s>"}}))
    template = load_chat_template(None, tmp_path)
    assert template.source == LLAMA2 and template.render([("user", "a")]) == "<s>[INST] a [/INST]"
    (tmp_path / "mine.jinja").write_text(ZEPHYR)
    assert load_chat_template(tmp_path / "mine.jinja", tmp_path).source == ZEPHYR


def test_json_layout_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"prefix": "<chat>\n", "message": "<{role}> {content}\n",
                                "roles": {"system": "[{content}]\n"}, "generation_prompt": "<assistant>",
                                "stop": ["<user>"]}))
    template = load_chat_template(path)
    assert template.render([("system", "x"), ("user", "a {b}")]) == "<chat>\n[x]\n<user> a {b}\n<assistant>"
    assert template.stop == ("<user>",)
    for content, message in [({"message": "{name}"}, "unknown field {name}"), ({"mesage": "x"}, "unknown key"),
                             ({"message": "{role"}, "literal braces"), ({"stop": [""]}, "non-empty")]:
        path.write_text(json.dumps(content))
        with pytest.raises(UserError, match=message):
            load_chat_template(path)


def test_template_errors_are_one_line():
    with pytest.raises(UserError, match="raised an error: Conversation roles must alternate"):
        JinjaTemplate(LLAMA2, {"bos_token": "<s>"}).render([("user", "a"), ("user", "b")])
    with pytest.raises(UserError, match=r"not a valid Jinja template \(.*line 1\)"):
        JinjaTemplate("{% for m in messages %}")
    with pytest.raises(UserError, match="raised an error"):  # the sandbox refuses Python internals
        JinjaTemplate("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}").render([("user", "a")])
