"""`llmcli env`: the versions, device, threads and caches of this environment; secrets stay hidden."""

from __future__ import annotations

import json

import torch


def test_env_lists_versions_device_threads_and_caches(cli, cache_dir, monkeypatch):
    monkeypatch.setenv("LLMCLI_API_KEY", "sekrit")
    result = cli("env")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"- torch version: {torch.__version__}" in lines
    assert f"- data cache: {cache_dir}" in lines
    assert "- device (--device auto): " + ("cuda" if torch.cuda.is_available() else "cpu") in lines
    assert "- $LLMCLI_API_KEY: set" in lines and "sekrit" not in result.stdout
    assert any(line.startswith("- cpu threads (llmcli's choice now): ") for line in lines)


def test_env_json_is_one_object(cli, monkeypatch):
    monkeypatch.delenv("LLMCLI_API_KEY", raising=False)
    facts = json.loads(cli("env", "--json").stdout)
    assert facts["llmcli"] and facts["$LLMCLI_API_KEY"] == "unset"
