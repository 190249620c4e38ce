"""train.accelerate_config: an Accelerate YAML or a DeepSpeed JSON passes its other settings through;
what a train.* key sets is refused in the file, naming the key."""

from __future__ import annotations

import json

import pytest

from llmcli.config_loader import load_config
from llmcli.errors import UserError
from llmcli.train.engine_config import read_engine_file


def train_config(tmp_path, name: str, text: str, strategy: str):
    (tmp_path / name).write_text(text)
    return load_config(None, [f"train.strategy={strategy}", f"train.accelerate_config={tmp_path / name}"]).train


def test_an_accelerate_yaml_passes_fsdp_plugin_settings(tmp_path):
    t = train_config(tmp_path, "a.yaml", "distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n"
                     "  fsdp_cpu_ram_efficient_loading: false\n  fsdp_sync_module_states: true\n", "fsdp")
    assert read_engine_file(t).fsdp == {"cpu_ram_efficient_loading": False, "sync_module_states": True}


def test_a_deepspeed_json_passes_through_directly_or_from_the_yaml(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"steps_per_print": 7, "zero_optimization": {"overlap_comm": True}}))
    direct = read_engine_file(train_config(tmp_path, "ds.json", (tmp_path / "ds.json").read_text(), "deepspeed"))
    via = read_engine_file(train_config(tmp_path, "a.yaml", "deepspeed_config:\n  deepspeed_config_file: ds.json\n",
                                        "deepspeed"))
    assert direct.deepspeed == via.deepspeed == {"steps_per_print": 7, "zero_optimization": {"overlap_comm": True}}


@pytest.mark.parametrize("name, text, strategy, fragment", [
    ("a.yaml", "fsdp_config:\n  fsdp_offload_params: true\n", "fsdp", "is set by train.cpu_offload"),
    ("a.yaml", "fsdp_config:\n  fsdp_no_such_thing: 1\n", "fsdp", "not a setting of Accelerate's FSDP plugin"),
    ("a.yaml", "distributed_type: DEEPSPEED\n", "fsdp", "distributed_type is DEEPSPEED, but train.strategy=fsdp"),
    ("ds.json", '{"zero_optimization": {"stage": 3}}', "deepspeed", "zero_optimization.stage is set by train.zero_stage"),
    ("ds.json", '{"train_batch_size": 8}', "deepspeed", "is set by train.batch_size"),
    ("ds.json", "{not json", "deepspeed", "not valid JSON"),
    ("ds.json", "{}", "fsdp", "a JSON file is a DeepSpeed config"),
    ("a.yaml", "[]\n", "fsdp", "expected an Accelerate config"),
    ("a.yaml", "''\n", "fsdp", "expected an Accelerate config"),
])
def test_what_llmcli_sets_is_refused_in_the_file(tmp_path, name, text, strategy, fragment):
    with pytest.raises(UserError) as refused:
        read_engine_file(train_config(tmp_path, name, text, strategy))
    assert fragment in str(refused.value) and "\n" not in str(refused.value)
