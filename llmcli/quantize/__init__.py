"""Weight quantization: kernels.py (tensor arithmetic), modules.py (quantized layers, whole-model
swaps, the stored format), command.py (`llmcli quantize`: write, measure, report)."""
