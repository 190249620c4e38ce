from pathlib import Path

import pytest
import yaml

from llmcli.config import Config
from llmcli.config_loader import load_config
from llmcli.errors import ConfigError

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.data.source == "shakespeare" and cfg.tokenizer.kind == "char"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    load_config(path)


def test_file_then_overrides(tmp_path):
    path = write(tmp_path, "model:\n  n_layer: 3\ntrain:\n  lr: 3e-4\n")
    cfg = load_config(path, ["model.n_layer=2", "train.max_steps=7", "data.val_plays=[hamlet, macbeth]"])
    assert cfg.model.n_layer == 2
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string; we accept it
    assert cfg.train.max_steps == 7
    assert cfg.data.val_plays == ["hamlet", "macbeth"]


def test_null_override_and_int_for_float(tmp_path):
    cfg = load_config(None, ["model.n_kv_head=null", "train.lr=1"])
    assert cfg.model.n_kv_head is None and cfg.train.lr == 1.0


def test_preset_fills_unset_fields_only():
    cfg = load_config(None, ["model.preset=llama", "model.bias=true"])
    assert cfg.model.norm == "rmsnorm" and cfg.model.pos == "rope" and cfg.model.act == "swiglu"
    assert cfg.model.bias is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_layr=2"], "unknown key 'model.n_layr' (from override 'model.n_layr=2'); did you mean n_layer?"),
        (["modle.n_layer=2"], "unknown section 'modle'"),
        (["train.lr=fast"], "train.lr: must be a number; got 'fast'"),
        (["train.max_steps=2.5"], "train.max_steps: must be an integer"),
        (["train.max_steps=0"], "train.max_steps: must be >= 1; got 0"),
        (["train.lr=0"], "train.lr: must be > 0"),
        (["model.dropout=1.5"], "model.dropout: must be <= 1"),
        (["model.norm=batchnorm"], "model.norm: must be one of layernorm, rmsnorm"),
        (["model.bias=1"], "model.bias: must be true or false"),
        (["model.n_head=3"], "n_head=3 must divide d_model=128"),
        (["model.n_head=4", "model.n_kv_head=3"], "n_kv_head=3 must divide n_head=4"),
        (["model.value_embeds=-1"], "model.value_embeds: must be >= 0; got -1"),
        (["model.value_embeds=1", "model.layer_value_embeds=[0,-1]"],
         "model.layer_value_embeds: needs one table per layer (n_layer=4), -1 for none, using every table 0..0"),
        (["model.value_embeds=3"], ("model.value_embeds: 3 tables need 2 * 3 layers (each feeds one of the first "
                                   "and one of the last layers); n_layer=4")),
        (["train.max_steps=null"], "set train.max_steps, train.max_epochs or train.max_minutes"),
        (["train.min_lr=1", "train.lr=0.1"], "min_lr=1 is larger than lr=0.1"),
        (["model.preset=gpt3"], "model.preset: must be one of gpt2, llama"),
        (["n_layer=2"], "key must be section.key"),
        (["model.n_layer"], "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_errors_name_the_file(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=rf"train.batch_size: must be an integer; got 'many' \(from {path}\)"):
        load_config(path)


@pytest.mark.parametrize("text, message", [
    ("train: [1, 2]\n", "'train' in"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("[]\n", "top level must be a mapping"),
    ("''\n", "top level must be a mapping"),
    ("0\n", "top level must be a mapping"),
    ("false\n", "top level must be a mapping"),
    ("model: {n_layer: 2\n", "not valid YAML"),
])
def test_malformed_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_a_list_as_config_is_one_line_on_the_command_line(tmp_path, cli, one_line_error):
    one_line_error(cli("data", "prepare", "-c", write(tmp_path, "[]\n")), "top level must be a mapping")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["model.preset=llama", "model.n_kv_head=2", "train.max_minutes=1.5"])
    cfg.save(tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
    assert yaml.safe_load((tmp_path / "out.yaml").read_text())["model"]["n_kv_head"] == 2


# --- model families --------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["model.arch=lstm", "model.n_head=4"],
     "model.n_head: does not apply to model.arch=lstm (only to transformer and encoder-decoder) (from override 'model.n_head=4')"),
    (["model.arch=gru", "model.preset=llama"], "model.preset: does not apply to model.arch=gru"),
    (["model.arch=rnn", "model.pos=rope"], "model.pos: does not apply to model.arch=rnn"),
    (["model.d_hidden=64"], "model.d_hidden: does not apply to model.arch=transformer (only to lstm, gru, rnn, gru-seq2seq and lstm-seq2seq)"),
    (["model.arch=gru", "model.qk_norm=true"], "model.qk_norm: does not apply to model.arch=gru (only to transformer)"),
    (["model.arch=lstm", "model.value_embeds=1"],
     "model.value_embeds: does not apply to model.arch=lstm (only to transformer)"),
    (["model.weight_drop=0.2"], "model.weight_drop: does not apply to model.arch=transformer (only to lstm, gru and rnn)"),
    (["model.arch=mamba"], "model.arch: must be one of transformer, lstm, gru, rnn"),
])
def test_settings_of_another_family_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_recurrent_config_keeps_only_its_own_settings(tmp_path):
    cfg = load_config(None, ["model.arch=lstm", "model.d_model=650", "model.d_hidden=650", "model.n_layer=2"])
    assert cfg.model.hidden_size == 650  # 650 % n_head is not checked: heads mean nothing to an LSTM
    saved = cfg.model.to_dict()
    assert set(saved) == {"arch", "n_layer", "d_model", "d_hidden", "vocab_size", "block_size", "dropout", "bias",
                          "tie_embeddings", "embed_dropout", "weight_drop"}
    cfg.save(tmp_path / "c.yaml")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["model"] == saved
    assert load_config(tmp_path / "c.yaml") == cfg
    untied = load_config(None, ["model.arch=gru", "model.d_hidden=96", "model.tie_embeddings=false"])
    assert untied.model.hidden_size == 96
    assert "d_hidden" not in load_config().model.to_dict()  # nor does a transformer save recurrent ones


def test_epochs_replace_the_default_step_count():
    cfg = load_config(None, ["train.max_epochs=3"])
    assert cfg.train.max_epochs == 3 and cfg.train.max_steps is None
    with pytest.raises(ConfigError, match="give train.max_epochs or train.max_steps, not both"):
        load_config(None, ["train.max_epochs=3", "train.max_steps=100"])
    assert load_config(None, ["train.max_epochs=3", "train.max_steps=null"]).train.max_steps is None


@pytest.mark.parametrize("word", ["no", "off", "yes", "on"])
def test_string_keys_take_yaml_1_1_boolean_words_as_strings(tmp_path, word):
    assert load_config(None, [f"data.source={word}"]).data.source == word
    assert load_config(write(tmp_path, f"data:\n  source: {word}\n")).data.source == word


def test_the_documented_mixed_precision_override_works():
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision: must be one of no, bf16, fp16; got 'off'"):
        load_config(None, ["train.mixed_precision=off"])


def test_bool_keys_take_words_and_refuse_the_rest():
    assert load_config(None, ["model.bias=no", "train.compile=on"]).model.bias is False
    assert load_config(None, ["train.compile=yes"]).train.compile is True
    with pytest.raises(ConfigError, match="model.bias: must be true or false; got 'maybe'"):
        load_config(None, ["model.bias=maybe"])


def test_a_key_given_twice_is_refused_naming_it(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n  max_steps: 5\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"the key 'lr' appears twice \(line 4\)"):
        load_config(path)
    path = write(tmp_path, "train: {lr: 0.1}\ntrain: {lr: 0.2}\n")
    with pytest.raises(ConfigError, match="the key 'train' appears twice"):
        load_config(path)
