"""The lm-evaluation-harness adapter: a local task (lm-eval's YAML format, a local JSON dataset) scored as
computed by hand, rolling log-likelihoods as our own disjoint-window scoring, generation as greedy
decoding by hand, `llmcli eval --tasks` and lm-eval's own command line with `--model llmcli`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llmcli.evaluate import score_tokens
from llmcli.lm_eval_adapter import LlmcliLM
from llmcli.load import load_checkpoint
from llmcli.tokenizer import encode

QUESTIONS = ["LINE 3: the quick", "LINE 4: the lazy", "LINE 5: the brown", "LINE 6: jumps",
             "LINE 1: the quick brown", "and so", "over the", "LINE 2:"]
CHOICES = ["fox", "dog", "cat", "on", "the"]


def task_yaml(tmp_path, name: str, records: list[dict], body: str):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    f"test_split: test\ndoc_to_text: question\n{body}")
    return path


@pytest.fixture(scope="module")
def loaded(trained_runs):
    return load_checkpoint(trained_runs["gpt2"])


def by_hand(loaded, context: str, continuation: str) -> float:
    """log P(continuation | context): one forward pass, char tokens."""
    model, tokenizer = loaded.model, loaded.tokenizer
    ctx, full = encode(tokenizer, context), encode(tokenizer, context + continuation)
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([full[:-1]])), -1)[0]
    return sum(logprobs[i - 1, full[i]].item() for i in range(len(ctx), len(full)))


def greedy_by_hand(loaded, prompt: str, n: int) -> str:
    model, tokenizer = loaded.model, loaded.tokenizer
    ids, out = encode(tokenizer, prompt), []
    for _ in range(n):
        with torch.no_grad():
            token = int(model(torch.tensor([(ids + out)[-32:]]))[0, -1].argmax())
        if token == tokenizer.token_to_id("<|endoftext|>"):
            break
        out.append(token)
    return tokenizer.decode(out).split("\n")[0]


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory, loaded):
    """A multiple-choice task whose accuracy is computed here by hand: 4 of 8 golds are the choice the
    model likes best, 4 the one it likes least."""
    records, correct = [], 0
    for i, question in enumerate(QUESTIONS):
        scores = [by_hand(loaded, question, " " + c) for c in CHOICES]
        best = max(range(len(CHOICES)), key=scores.__getitem__)
        answer = best if i % 2 == 0 else min(range(len(CHOICES)), key=scores.__getitem__)
        records.append({"question": question, "choices": CHOICES, "answer": answer})
        correct += answer == best
    path = task_yaml(tmp_path_factory.mktemp("tasks"), "tiny_mc", records,
                     "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: answer\n"
                     "metric_list:\n  - metric: acc\n")
    return path, correct / len(records)


def test_multiple_choice_accuracy_equals_the_hand_computation(cli, trained_runs, mc_task):
    path, expected = mc_task
    assert expected == 0.5
    result = cli("eval", trained_runs["gpt2"], "--tasks", path, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    acc = next(r for r in rows if r["metric"] == "acc")
    assert acc["task"] == "tiny_mc" and acc["value"] == expected and acc["samples"] == len(QUESTIONS)
    table = cli("eval", trained_runs["gpt2"], "--tasks", path, "--limit", "4")
    assert table.exit_code == 0, table.output
    assert "tiny_mc" in table.stdout and "acc" in table.stdout and "scored with lm-evaluation-harness" in table.stdout


def test_loglikelihood_matches_by_hand(loaded, trained_runs):
    from lm_eval.api.instance import Instance

    lm = LlmcliLM(str(trained_runs["gpt2"]), batch_size=3)
    pairs = [("LINE 3: the ", "quick brown"), ("", "LINE 1"), ("and so on", " 4."), ("x", " the lazy dog")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for (context, continuation), (logprob, _) in zip(pairs, lm.loglikelihood(requests), strict=True):
        spaces = len(context) - len(context.rstrip())
        context, continuation = context.rstrip(), context[len(context) - spaces:] + continuation
        hand = by_hand(loaded, context or "<|endoftext|>", continuation)
        assert logprob == pytest.approx(hand, abs=1e-4)


def test_rolling_equals_disjoint_window_scoring(loaded, trained_runs):
    from lm_eval.api.instance import Instance

    model, tokenizer = loaded.model, loaded.tokenizer
    lm = LlmcliLM(str(trained_runs["gpt2"]))
    texts = ["LINE 7: the quick brown fox", "".join(f"LINE {i}: the lazy dog.\n" for i in range(9))]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    for text, total in zip(texts, got, strict=True):
        ours = score_tokens(model, encode(tokenizer, text), stride=model.context_length,
                            first_token=tokenizer.token_to_id("<|endoftext|>"))
        assert total == pytest.approx(-ours["nll"], abs=1e-3) and math.isfinite(total)


def test_generate_until_is_greedy_decoding(cli, trained_runs, loaded, tmp_path):
    records = []
    for i, question in enumerate(QUESTIONS[:6]):
        answer = greedy_by_hand(loaded, question, 8) if i < 3 else "nope"
        records.append({"question": question, "answer": answer})
    path = task_yaml(tmp_path, "tiny_gen", records,
                     "output_type: generate_until\ndoc_to_target: answer\ntarget_delimiter: ''\n"
                     "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
                     "metric_list:\n  - metric: exact_match\n")
    rows = [json.loads(line) for line in cli("eval", trained_runs["gpt2"], "--tasks", path, "--json").stdout.splitlines()]
    assert next(r for r in rows if r["metric"] == "exact_match")["value"] == 0.5


@pytest.mark.slow
def test_lm_eval_command_line_with_our_model(trained_runs, mc_task, tmp_path):
    path, expected = mc_task
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "llmcli.lm_eval_adapter", "run", "--model", "llmcli", "--model_args",
                          f"path={trained_runs['gpt2']}", "--tasks", str(path), "--output_path", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["results"]["tiny_mc"]["acc,none"] == expected


def test_cli_refusals(cli, one_line_error, trained_runs, tmp_path):
    one_line_error(cli("eval", trained_runs["gpt2"], "--tasks", tmp_path / "missing.yaml"), "task file not found")
    one_line_error(cli("eval", trained_runs["gpt2"], "--limit", "3"), "--limit applies to sequence-to-sequence models and --tasks")
