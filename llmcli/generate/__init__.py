"""Text generation: sampling.py (a token from logits), engine.py (continuous batching in token ids),
text.py (incremental decoding, stop strings, text in and out), run.py (`llmcli generate`)."""
