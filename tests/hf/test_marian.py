"""Tests for llmcli/hf/marian.py and seq2seq.py: our encoder-decoder <-> transformers' MarianMTModel.

Both directions as for the decoder-only models: logits within 1e-4 in float32 (padded sources
included) and identical greedy outputs, ours from the generation engine and `llmcli generate`,
theirs from `generate()` with the folder's own tokenizer and generation config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmcli.checkpoint import SOURCE_TOKENIZER, load_model, write_checkpoint
from llmcli.config import Config, DataConfig, SourceTokenizerConfig, TokenizerConfig
from llmcli.hf.export import export_hf
from llmcli.hf.importer import import_hf
from llmcli.options.checkpoints import ExportOptions, ImportOptions
from llmcli.tokenizer import EOT, eot_id, load_tokenizer, save_tokenizer, train_tokenizer

WORDS = ["shakespeare", "hamlet", "tempest", "macbeth", "romeo", "juliet", "verona", "othello", "lear", "puck"]
PHONES = ["SH EY K S P IH R", "HH AE M L AH T", "T EH M P AH S T", "M AH K B EH TH", "R OW M IY OW",
          "JH UW L IY EH T", "V ER OW N AH", "OW TH EH L OW", "L IH R", "P AH K"]
STEPS = 16  # greedy tokens compared (the tiny decoder's context is 24)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    """tokenizer.json files: "source" (characters of WORDS), "target" (PHONES as words), "shared" (both)."""
    root = tmp_path_factory.mktemp("marian-tok")
    specs = {"source": ("char", WORDS), "target": ("word", PHONES), "shared": ("char", WORDS + PHONES)}
    paths = {}
    for name, (kind, texts) in specs.items():
        paths[name] = root / f"{name}.json"
        save_tokenizer(train_tokenizer(TokenizerConfig(kind=kind, min_frequency=1), ["\n".join(texts)]), paths[name])
    return paths


def vocab_of(path: Path) -> int:
    """The tokenizer's vocabulary size (its special tokens included)."""
    return load_tokenizer(path).get_vocab_size(with_added_tokens=True)


@pytest.fixture
def seq2seq_checkpoint(tiny_seq2seq, perturb, tokenizers):
    """seq2seq_checkpoint(path, shared=False, **config): (model, a checkpoint directory at `path`) of a
    perturbed 2 + 2-layer encoder-decoder over the test tokenizers."""

    def make(path: Path, shared: bool = False, **overrides):
        target = tokenizers["shared" if shared else "target"]
        source = None if shared else tokenizers["source"]
        vocab = vocab_of(target)
        model = perturb(tiny_seq2seq("encoder-decoder", vocab, vocab_of(source) if source else vocab,
                                     share_embeddings=shared, **overrides))
        cfg = Config(data=DataConfig(task="seq2seq", source="cmudict"), model=model.config,
                     tokenizer=TokenizerConfig(kind="char" if shared else "word"),
                     source_tokenizer=SourceTokenizerConfig(kind="shared" if shared else "char"))
        files = {} if shared else {SOURCE_TOKENIZER: source.read_bytes()}
        write_checkpoint(path, model, cfg, target.read_bytes(), {"step": 1}, files)
        return model, path

    return make


def _sources(src_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three padded sources (lengths 12, 9, 5; each ends with <|endoftext|> = 0) and their mask."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([12, 9, 5])
    ids = torch.randint(2, src_vocab, (3, 12), generator=gen)
    mask = torch.arange(12)[None] < lengths[:, None]
    ids[torch.arange(3), lengths - 1] = 0
    return ids.masked_fill(~mask, 0), mask


def _our_greedy(model, sources: torch.Tensor, mask: torch.Tensor, eot: int) -> list[list[int]]:
    from llmcli.generate.engine import Engine
    from llmcli.options.sampling import SamplingParams

    engine = Engine(model, max_batch_size=len(sources))
    params = SamplingParams(max_new_tokens=STEPS, temperature=0.0)
    ids = [engine.add([eot], params, source_ids=row[m].tolist()) for row, m in zip(sources, mask, strict=True)]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for event in engine.step():
            out[event.id].append(event.token)
    return [out[i] for i in ids]


def _hf_greedy(transformers, hf, sources: torch.Tensor, mask: torch.Tensor, eot: int) -> list[list[int]]:
    config = transformers.GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=STEPS, eos_token_id=None,
                                           pad_token_id=eot, decoder_start_token_id=eot)
    with torch.no_grad():
        out = hf.generate(input_ids=sources, attention_mask=mask.long(), generation_config=config)
    assert (out[:, 0] == eot).all()
    return out[:, 1:].tolist()


def check_marian_parity(transformers, ours, hf, label: str) -> None:
    """Logits within 1e-4 over padded sources, and identical greedy tokens."""
    eot = 0
    sources, mask = _sources(ours.config.source_vocab_size)
    targets = torch.randint(0, ours.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mine = ours(targets, source=sources, source_lengths=mask.sum(1).tolist())
        theirs = hf(input_ids=sources, attention_mask=mask.long(), decoder_input_ids=targets).logits
    diff = (mine - theirs).abs().max().item()
    print(f"{label}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4
    ours_tokens, hf_tokens = _our_greedy(ours, sources, mask, eot), _hf_greedy(transformers, hf, sources, mask, eot)
    assert ours_tokens == hf_tokens
    assert all(len(row) == STEPS for row in ours_tokens)
    assert len({tuple(row) for row in ours_tokens}) >= 2  # the sources really steer the decoder


EXPORT_VARIANTS = [
    pytest.param(False, {}, id="own-tokenizers-tied-relu"),
    pytest.param(True, {"tie_embeddings": False, "act": "gelu", "d_ff": 48,
                        "n_encoder_layer": 3}, id="shared-untied-gelu"),
]


@pytest.mark.parametrize("shared,extra", EXPORT_VARIANTS)
def test_export_loads_as_marian_with_same_logits_and_greedy_outputs(
        tmp_path, transformers, seq2seq_checkpoint, shared, extra):
    model, run = seq2seq_checkpoint(tmp_path / "run", shared=shared, **extra)
    result = export_hf(ExportOptions(run_dir=run, out=tmp_path / "hf"))
    assert result.architecture == "MarianMTModel" and result.loader == "AutoModelForSeq2SeqLM"
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "MarianMTModel"
    assert hf.config.encoder_layers == model.config.encoder_layers and hf.config.decoder_layers == 2
    check_marian_parity(transformers, model, hf, f"export {extra}")


def test_exported_folder_tokenizes_and_generates_as_llmcli_generate(
        tmp_path, transformers, seq2seq_checkpoint, cli):
    """The folder's tokenizers and generation_config.json: transformers alone decodes the same text."""
    _, run = seq2seq_checkpoint(tmp_path / "run")
    export_hf(ExportOptions(run_dir=run, out=tmp_path / "hf"))
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    source_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    target_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf" / "target_tokenizer")
    for word in ("hamlet", "puck", "shakespeare"):
        encoded = source_tok(word, return_tensors="pt")
        assert encoded["input_ids"][0, -1].item() == 0  # the end token our encoder expects
        with torch.no_grad():
            out = hf.generate(**encoded)  # the folder's generation_config.json: greedy, stops at <|endoftext|>
        ids = out[0, 1:].tolist()  # after the decoder's start token, up to its end token
        theirs = target_tok.decode(ids[:-1] if ids[-1] == 0 else ids, skip_special_tokens=False).strip()
        result = cli("generate", run, word, "-t", "0", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["target"].strip() == theirs and theirs


@pytest.mark.parametrize("overrides,fragment", [
    ({"norm_placement": "pre"}, "model.norm_placement=pre cannot be exported as MarianMTModel"),
    ({"pos": "learned", "bias": False}, "model.pos=learned, model.bias=false cannot be exported"),
])
def test_export_refuses_what_marian_cannot_express(tmp_path, seq2seq_checkpoint, cli, one_line_error,
                                                   overrides, fragment):
    _, run = seq2seq_checkpoint(tmp_path / "run", **overrides)
    one_line_error(cli("export", run, "--out", tmp_path / "hf"), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_refuses_a_recurrent_seq2seq(tmp_path, seq2seq_runs, cli, one_line_error):
    one_line_error(cli("export", seq2seq_runs["gru-seq2seq"], "--out", tmp_path / "hf"),
                   "model.arch=gru-seq2seq", "transformers has no")
    assert not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------------------------
# Import: a randomly initialised MarianMTModel saved with save_pretrained


@pytest.fixture
def marian_folder(transformers, tokenizers, perturb):
    """marian_folder(path, shared=True, **config): (MarianMTModel, its save_pretrained folder with
    a tokenizer.json, and target_tokenizer/ when the sides have their own vocabularies)."""

    def make(path: Path, shared: bool = True, **overrides):
        target = tokenizers["shared" if shared else "target"]
        fields = dict(vocab_size=vocab_of(tokenizers["shared" if shared else "source"]),
                      decoder_vocab_size=vocab_of(target), share_encoder_decoder_embeddings=shared, d_model=32,
                      encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                      encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32, scale_embedding=True,
                      activation_function="relu", pad_token_id=0, eos_token_id=0, decoder_start_token_id=0,
                      forced_eos_token_id=None)
        fields.update(overrides)
        torch.manual_seed(0)
        hf = transformers.MarianMTModel(transformers.MarianConfig(**fields))
        sinusoids = {k: v.clone() for k, v in hf.state_dict().items() if "embed_positions" in k}
        perturb(hf)
        with torch.no_grad():
            hf.final_logits_bias.normal_(0.0, 0.1)  # a buffer: perturb leaves it at zeros
            for name, table in sinusoids.items():  # parameters too, but fixed: not for perturbing
                hf.get_parameter(name).copy_(table)
        hf.save_pretrained(path)
        fast = transformers.PreTrainedTokenizerFast
        side = tokenizers["shared" if shared else "source"]
        fast(tokenizer_file=str(side), eos_token=EOT, pad_token=EOT).save_pretrained(path)
        if not shared:
            fast(tokenizer_file=str(target), eos_token=EOT, pad_token=EOT).save_pretrained(path / "target_tokenizer")
        return hf, path

    return make


IMPORT_VARIANTS = [
    pytest.param(True, {}, id="shared-tied"),
    pytest.param(False, {"tie_word_embeddings": False, "activation_function": "gelu", "encoder_layers": 3},
                 id="own-vocabularies-untied-gelu"),
]


@pytest.mark.parametrize("shared,extra", IMPORT_VARIANTS)
def test_import_marian_gives_same_logits_and_greedy_outputs(tmp_path, transformers, marian_folder, shared, extra):
    hf, folder = marian_folder(tmp_path / "hf", shared=shared, **extra)
    result = import_hf(ImportOptions(source=str(folder), out=tmp_path / "run"))
    assert result.family == "marian" and result.architecture == "MarianMTModel"
    ours = load_model(tmp_path / "run").eval()
    assert ours.config.arch == "encoder-decoder" and ours.config.share_embeddings == shared
    assert ours.config.tie_embeddings == extra.get("tie_word_embeddings", True)
    assert (tmp_path / "run" / SOURCE_TOKENIZER).is_file() != shared
    check_marian_parity(transformers, ours, hf.eval(), f"import {extra}")


def test_import_then_export_gives_back_the_same_tensors(tmp_path, transformers, marian_folder, state_equal):
    from safetensors.torch import load_file

    hf, folder = marian_folder(tmp_path / "hf", shared=False)
    import_hf(ImportOptions(source=str(folder), out=tmp_path / "run"))
    export_hf(ExportOptions(run_dir=tmp_path / "run", out=tmp_path / "again"))
    # lm_head is the decoder's table (tied: written once); the sinusoids are not weights
    original = {k: v.contiguous() for k, v in hf.state_dict().items()
                if "embed_positions" not in k and k != "lm_head.weight"}
    state_equal(load_file(str(tmp_path / "again" / "model.safetensors")), original)
    source = transformers.AutoTokenizer.from_pretrained(tmp_path / "again")
    assert source("hamlet")["input_ids"][-1] == eot_id(load_tokenizer(tmp_path / "run" / "tokenizer.json"))


@pytest.mark.parametrize("changes,fragment", [
    ({"scale_embedding": False}, "scale_embedding=False is not supported"),
    ({"activation_function": "swish"}, "activation_function=swish is not supported"),
    ({"decoder_ffn_dim": 48}, "encoder_ffn_dim=64 and decoder_ffn_dim=48 differ"),
])
def test_import_refuses_marian_configs_we_cannot_express(tmp_path, marian_folder, edit_config, cli,
                                                         one_line_error, changes, fragment):
    _, folder = marian_folder(tmp_path / "hf")
    edit_config(folder, **changes)
    one_line_error(cli("import", folder, "--out", tmp_path / "run"), fragment)
    assert not (tmp_path / "run").exists()

