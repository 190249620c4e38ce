"""Exported GGUF files in the real llama.cpp (llama-cpp-python: the `.[gguf]` extra, `make test-gguf`):
logits, greedy continuations, tokenizer ids, LoRA adapters and the chat template against llmcli's.
The whole module skips when llama_cpp is not installed; the numbers it prints are in docs/gguf.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmcli.checkpoint import load_model
from llmcli.tokenizer import EOT, decode, load_tokenizer
from tests.llamacpp.conftest import VARIED

pytest.importorskip("llama_cpp")

TEXTS = {
    "ascii": "ROMEO: But, soft! what light through yonder window breaks? It's 3.14159, isn't it?",
    "chinese": "东京的天气很好。我们今天去公园吧！中文分词测试",
    "emoji": "Emoji: 🤖🎉👍🏽 👨‍👩‍👧 ❤️",
    "code": 'def greet(name: str) -> str:\n    return f"Hello, {name}!"  # code\n',
    "whitespace": "\tindent\t\ttabs   and      spaces    \n\n\n   trailing   \r\n",
    "end token": "the end" + EOT + " and after" + EOT + EOT,
    "all": VARIED,
}


def logits_of(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for `ids` from an empty context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def ours(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def random_ids(vocab: int, n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


VARIANTS = [
    pytest.param("llama", {}, id="llama-untied"),
    pytest.param("llama", {"n_kv_head": 2, "tie_embeddings": True, "rope_theta": 500.0, "norm_eps": 1e-6},
                 id="llama-gqa-tied"),
    pytest.param("gpt2", {}, id="gpt2-tied"),
    pytest.param("gpt2", {"tie_embeddings": False, "d_ff": 96}, id="gpt2-untied-dff96"),
]


@pytest.mark.parametrize("preset,extra", VARIANTS)
def test_float32_logits_equal_llmcli(tmp_path, make_run, export, load_gguf, ggml_gelu, preset, extra):
    """Llama-style: within 1e-3 of llmcli. GPT-2-style: within 1e-3 of llmcli computing its GELU as ggml's
    CPU backend does (through a float16 table); its distance to our exact GELU is printed beside."""
    run = make_run(preset, **extra)
    model = load_model(run).eval()
    ids = random_ids(model.config.vocab_size, 120)
    with load_gguf(export(run, tmp_path / "m.gguf")) as llm:
        theirs = logits_of(llm, ids)
    exact = np.abs(theirs - ours(model, ids)).max()
    if preset == "gpt2":
        with ggml_gelu():
            table = np.abs(theirs - ours(model, ids)).max()
        print(f"\nf32 {preset} {extra}: max |logit diff| {exact:.2e} vs llmcli, {table:.2e} vs llmcli with ggml's "
              f"float16 GELU table (logits up to {np.abs(theirs).max():.1f})")
        assert table <= 1e-3 and exact <= 1e-2
    else:
        print(f"\nf32 {preset} {extra}: max |logit diff| {exact:.2e} vs llmcli (logits up to "
              f"{np.abs(theirs).max():.1f})")
        assert exact <= 1e-3


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_float32_logits_of_trained_models(tmp_path, trained_char_runs, export, load_gguf, ggml_gelu, preset):
    """Trained weights (not the large random ones above), judged as above."""
    run = trained_char_runs[preset]
    model = load_model(run).eval()
    tok = load_tokenizer(run / "tokenizer.json")
    ids = tok.encode("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n").ids
    with load_gguf(export(run, tmp_path / "m.gguf")) as llm:
        theirs = logits_of(llm, ids)
    exact = np.abs(theirs - ours(model, ids)).max()
    with ggml_gelu():
        table = np.abs(theirs - ours(model, ids)).max()
    print(f"\nf32 trained {preset}: max |logit diff| {exact:.2e} vs llmcli" +
          (f", {table:.2e} with ggml's GELU" if preset == "gpt2" else "") +
          f" over {len(ids)} positions (logits up to {np.abs(theirs).max():.1f})")
    assert (table <= 1e-3 and exact <= 1e-2) if preset == "gpt2" else exact <= 1e-3


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_llama_cpp_tokenizer_gives_llmcli_ids(tmp_path, make_run, export, load_gguf, tokenizer_files, corpus, kind):
    tok = load_tokenizer(tokenizer_files[kind])
    with load_gguf(export(make_run("llama", kind), tmp_path / "m.gguf")) as llm:
        for name, text in {**TEXTS, "corpus": corpus}.items():
            ids = tok.encode(text).ids
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, name
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, name  # no BOS is added
            assert llm.detokenize(ids, special=True).decode() == decode(tok, ids), name
        print(f"\n{kind}: {len(tok.encode(corpus).ids)} ids from {len(corpus)} characters, all equal")


def greedy_llama_cpp(llm, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation from llama.cpp's logits (argmax each step, as llmcli's temperature 0 does)."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def greedy_llmcli(model, prompt: list[int], steps: int) -> list[int]:
    from llmcli.generate.engine import Engine
    from llmcli.options.sampling import SamplingParams

    engine = Engine(model, max_batch_size=1)
    engine.add(prompt, SamplingParams(max_new_tokens=steps, temperature=0.0, ignore_eot=True))
    out: list[int] = []
    while engine.has_work():
        out += [event.token for event in engine.step()]
    return out


def agreement(a: list[int], b: list[int]) -> int:
    """How many tokens the two continuations share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def test_q8_0_greedy_continuation_agrees_over_64_tokens(tmp_path, trained_char_runs, export, load_gguf):
    """A trained model, three prompts, 64 greedy tokens each: llama.cpp's q8_0 (quantized by gguf from float
    weights, and from llmcli's int8 checkpoint without a float round trip) against llmcli float32 and int8."""
    from llmcli.options.checkpoints import QuantizeOptions
    from llmcli.quantize.command import quantize_checkpoint

    trained_char_run = trained_char_runs["llama"]
    quantize_checkpoint(QuantizeOptions(run_dir=trained_char_run, out=tmp_path / "int8", method="int8",
                                        include_embeddings=True, eval_tokens=0, decode_tokens=0))
    tok = load_tokenizer(trained_char_run / "tokenizer.json")
    prompts = [tok.encode(p).ids for p in ("Shall I compare thee", "When I do count the clock", "Look in thy glass")]
    cases = {"q8_0 from float32 vs llmcli float32": (trained_char_run, "q8_0"),
             "q8_0 from llmcli int8 vs llmcli int8": (tmp_path / "int8", "auto")}
    for label, (run, dtype) in cases.items():
        model = load_model(run).eval()
        with load_gguf(export(run, tmp_path / f"{dtype}.gguf", dtype=dtype)) as llm:
            shared, steps_agree, diff = [], 0, 0.0
            for prompt in prompts:
                ours_tokens = greedy_llmcli(model, prompt, 64)
                shared.append(agreement(greedy_llama_cpp(llm, prompt, 64), ours_tokens))
                # the same sequence in both: each step's argmax, and the logits
                ids = prompt + ours_tokens
                theirs, mine = logits_of(llm, ids), ours(model, ids)
                steps_agree += int((theirs.argmax(-1) == mine.argmax(-1))[len(prompt) - 1:-1].sum())
                diff = max(diff, float(np.abs(theirs - mine).max()))
        print(f"\n{label}: greedy continuations identical for {shared} of 64 tokens; argmax equal at "
              f"{steps_agree}/{64 * len(prompts)} steps of llmcli's continuations; max |logit diff| {diff:.3f}")
        # a near-tie that quantization flips sends a continuation its own way from there on
        assert steps_agree >= 0.95 * 64 * len(prompts) and sum(shared) >= 0.5 * 64 * len(prompts)


@pytest.mark.parametrize("preset,targets", [("llama", ["q", "k", "v", "o", "gate", "up", "down", "embed", "head"]),
                                            ("gpt2", ["q", "v", "o", "up"])])
def test_lora_adapter_in_llama_cpp_equals_the_merged_model(tmp_path, lora_checkpoint, export, load_gguf, ggml_gelu,
                                                          preset, targets):
    base, adapter = lora_checkpoint(preset, targets)
    merged = load_model(adapter).eval()
    ids = random_ids(merged.config.vocab_size, 100)
    with load_gguf(export(base, tmp_path / "base.gguf"), lora=export(adapter, tmp_path / "lora.gguf",
                                                                     adapter_only=True)) as llm:
        theirs = logits_of(llm, ids)
    with ggml_gelu():
        table = np.abs(theirs - ours(merged, ids)).max()
    exact = np.abs(theirs - ours(merged, ids)).max()
    print(f"\nLoRA adapter ({preset}, {', '.join(targets)}) on its base in llama.cpp vs llmcli merged: "
          f"max |logit diff| {exact:.2e}" + (f" ({table:.2e} with ggml's GELU)" if preset == "gpt2" else ""))
    assert (table if preset == "gpt2" else exact) <= 1e-3


def test_chat_template_and_generation_through_llama_cpp_python(tmp_path, trained_char_runs, export, load_gguf):
    """llama-cpp-python lays a conversation out with the file's template as `llmcli chat` does, and its
    greedy completion of a prompt is `llmcli generate --temperature 0`'s."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from llmcli.chat_template import load_chat_template

    trained_char_run = trained_char_runs["llama"]
    messages = [("system", "Answer in verse."), ("user", "Shall I compare thee?")]
    with load_gguf(export(trained_char_run, tmp_path / "m.gguf")) as llm:
        template = llm.metadata["tokenizer.chat_template"]
        prompt = Jinja2ChatFormatter(template, eos_token=EOT, bos_token=EOT)(
            messages=[{"role": r, "content": c} for r, c in messages]).prompt
        assert prompt == load_chat_template(directory=trained_char_run).render(messages)
        text = llm.create_completion("Shall I compare thee", max_tokens=48, temperature=0.0)["choices"][0]["text"]
    tok = load_tokenizer(trained_char_run / "tokenizer.json")
    model = load_model(trained_char_run).eval()
    assert text == tok.decode(greedy_llmcli(model, tok.encode("Shall I compare thee").ids, 48))
    print(f"\nllama.cpp greedy: {text!r}")
