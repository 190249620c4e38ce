"""llama.cpp interop: `llmcli export --format gguf`, one GGUF file that llama.cpp, ollama and LM Studio run.

vocab.py (our tokenizers as llama.cpp's `gpt2` tokenizer model), tensors.py (names, layouts and
types of the weights; quantized checkpoints without a float round trip), adapter.py (a LoRA run as a
GGUF LoRA adapter), modelfile.py (chat templates in ollama's Go template syntax, the Modelfile),
export.py (the command). Files are written with the `gguf` package, llama.cpp's own writer.
This file imports nothing.
"""
