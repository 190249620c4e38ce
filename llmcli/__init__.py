"""llmcli: train, evaluate, sample from, quantize and serve language models."""

__version__ = "0.1.0"
