"""`llmcli env`: the facts a bug report needs (as `accelerate env` and `trl env` print them):
versions, the device, CPU threads, caches and the environment variables llmcli reads."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from llmcli import __version__, ui
from llmcli.config import DataConfig
from llmcli.options.env import EnvOptions

LIBRARIES = ("torch", "accelerate", "transformers", "tokenizers", "datasets", "safetensors", "huggingface_hub",
             "peft", "lm_eval", "numpy", "typer", "rich", "fastapi", "uvicorn", "vllm", "deepspeed")
VARIABLES = ("LLMCLI_CACHE_DIR", "LLMCLI_API_KEY", "LLMCLI_DEBUG", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
             "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE")
SECRETS = ("LLMCLI_API_KEY",)


def env_command(opts: EnvOptions) -> None:
    facts = collect()
    if opts.json_out:
        ui.stdout.print(json.dumps(facts, indent=2), markup=False, soft_wrap=True)
        return
    ui.stdout.print("Copy and paste this into a bug report:", markup=False)
    for key, value in facts.items():
        ui.stdout.print(f"- {key}: {value}", markup=False, soft_wrap=True)


def collect() -> dict[str, str]:
    import torch

    from llmcli.data.sources import cache_root
    from llmcli.device import configure_threads, select_device

    facts = {"llmcli": __version__, "platform": platform.platform(),
             "python": f"{platform.python_version()} ({sys.executable})"}
    facts.update({f"{name} version": _version(name) for name in LIBRARIES})
    facts["device (--device auto)"] = str(select_device("auto"))
    facts["cuda"] = _cuda(torch)
    facts["mps available"] = str(torch.backends.mps.is_available())
    before = torch.get_num_threads()
    facts["cpu cores"] = f"{os.cpu_count()} ({_usable_cores()} usable by this process)"
    facts["cpu threads (llmcli's choice now)"] = str(configure_threads(None))
    torch.set_num_threads(before)
    facts["data cache"] = str(cache_root(DataConfig()))
    facts["hugging face cache"] = _hub_cache()
    facts["accelerate config"] = _accelerate_config()
    for name in VARIABLES:
        value = os.environ.get(name)
        facts[f"${name}"] = "unset" if value is None else ("set" if name in SECRETS else value)
    return facts


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "not installed"


def _cuda(torch) -> str:
    if not torch.cuda.is_available():
        return f"not available (torch built with CUDA {torch.version.cuda})" if torch.version.cuda else "not available"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"CUDA {torch.version.cuda}, {len(names)} GPU(s): {', '.join(names)}; bf16 {torch.cuda.is_bf16_supported()}"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _accelerate_config() -> str:
    from accelerate.commands.config import default_config_file

    return str(default_config_file) if Path(default_config_file).is_file() else f"none ({default_config_file})"
