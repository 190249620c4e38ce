"""Instruction and chat data: records read and checked, rendered through the chat template, prompt
tokens carrying no loss (in the arrays, in the training windows, in the loss itself)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from llmcli.chat_template import ChatTemplate, JinjaTemplate
from llmcli.data.formats import alpaca_messages, segments
from llmcli.data.prepare import prepare_data
from llmcli.train.finetune import IGNORE, ExampleWindows

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_alpaca_record_is_a_conversation():
    assert alpaca_messages({"instruction": "Add.", "input": "2 2", "output": "4"}, "x") == [
        ("user", "Add.\n\n2 2"), ("assistant", "4")]
    assert alpaca_messages({"instruction": "Hi", "output": "Hello"}, "x") == [("user", "Hi"), ("assistant", "Hello")]


def test_segments_mark_every_assistant_reply():
    messages = [("system", "Be brief."), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    pieces = segments(JinjaTemplate(CHATML), messages)
    assert "".join(t for t, _ in pieces) == JinjaTemplate(CHATML).render(messages, add_generation_prompt=False)
    assert [t for t, loss in pieces if loss] == ["b<|im_end|>\n", "d<|im_end|>\n"]
    default = segments(ChatTemplate(), [("user", "q"), ("assistant", "r")])
    assert default == [("user: q\nassistant:", False), (" r\n", True)]


def test_prompt_tokens_carry_no_loss(tmp_path, cfg, char_tokenizer):
    records = [{"instruction": f"say {w}", "output": f"the {w}"} for w in ("sun", "dog", "cat", "owl")] * 5
    source = tmp_path / "a.json"
    source.write_text(json.dumps(records))
    tok_path = tmp_path / "tok" / "tokenizer.json"
    tok_path.parent.mkdir()
    char_tokenizer.save(str(tok_path))
    prepared = prepare_data(cfg(f"data.source={source}", "data.format=alpaca", f"tokenizer.path={tok_path}",
                                "data.val_fraction=0.2"))
    tokens, (mask, starts) = prepared.tokens("train"), prepared.examples("train")
    assert len(starts) == 16 and prepared.stats["train"]["loss_tokens"] == int(np.asarray(mask).sum())
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(tokens)
        text = char_tokenizer.decode(tokens[start:end].tolist(), skip_special_tokens=False)
        trained = char_tokenizer.decode(tokens[start:end][mask[start:end] == 1].tolist(), skip_special_tokens=False)
        prompt, reply = text.split("\nassistant:")
        assert prompt.startswith("user: say ") and trained == reply  # " the sun\n<|endoftext|>"
        assert trained.endswith("\n<|endoftext|>")

    windows = ExampleWindows(tokens, mask, starts, 24, 6, seed=0, pad=prepared.eot_id, split="train")
    x, y = windows.batch(0, 0)
    for row in range(len(x)):
        start = next(s for s in starts if np.array_equal(tokens[s:s + 24], x[row].numpy()[:len(tokens) - s]))
        expect = mask[start + 1:start + 25].astype(bool)
        assert torch.equal(y[row] != IGNORE, torch.from_numpy(np.pad(expect, (0, 24 - len(expect)))))
    # The loss is the same whatever the model predicts at prompt positions.
    logits = torch.randn(*y.shape, prepared.vocab_size)
    changed = logits.clone()
    changed[y == IGNORE] = torch.randn_like(changed[y == IGNORE]) * 10
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    assert loss == F.cross_entropy(changed.flatten(0, 1), y.flatten(), ignore_index=IGNORE)

    plain = prepare_data(cfg(f"data.source={source}", "data.format=alpaca", f"tokenizer.path={tok_path}",
                             "data.val_fraction=0.2", "data.mask_prompt=false"))
    assert plain.dir != prepared.dir and np.asarray(plain.examples("train")[0]).all()


def test_chat_records_rendered_through_the_checkpoint_template(tmp_path, cfg, llama_tokenizer):
    folder = tmp_path / "base"
    folder.mkdir()
    tok = Tokenizer.from_str(llama_tokenizer.to_str())
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    source = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Speak"},
                                                               {"role": "assistant", "content": "Speak, speak."}]}] * 4)
    prepared = prepare_data(cfg(f"data.source={source}", "data.format=chat", f"tokenizer.path={folder / 'tokenizer.json'}",
                                "data.val_fraction=0.25"))
    tokens, (mask, _) = prepared.tokens("train"), prepared.examples("train")
    first = tokens[:len(tokens) // 3]
    text = tok.decode(first.tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\nSpeak<|im_end|>\n<|im_start|>assistant\nSpeak, speak.<|im_end|>\n")
    trained = tok.decode(first[mask[:len(first)] == 1].tolist(), skip_special_tokens=False)
    assert trained.startswith("Speak, speak.<|im_end|>\n")


@pytest.mark.parametrize("records, fragments", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}], ["line 2", "missing 'output'"]),
    ([{"instruction": "a", "output": 3}], ["line 1", "'output' must be a string"]),
])
def test_cli_bad_alpaca(tmp_path, cli, one_line_error, records, fragments):
    source = write_jsonl(tmp_path / "bad.jsonl", records)
    one_line_error(cli("data", "prepare", f"data.source={source}", "data.format=alpaca"), str(source), *fragments)


@pytest.mark.parametrize("messages, fragments", [
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
     ["messages[1] has role 'bot'", "roles are system, user, assistant"]),
    ([{"role": "user", "content": "a"}], ["no assistant message"]),
])
def test_cli_bad_chat(tmp_path, cli, one_line_error, messages, fragments):
    source = write_jsonl(tmp_path / "bad.jsonl", [{"messages": messages}])
    one_line_error(cli("data", "prepare", f"data.source={source}", "data.format=chat"), "line 1", *fragments)
