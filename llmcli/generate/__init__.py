"""Text generation: engine.py (continuous batching in token ids: scheduler.py plans a step, runner.py
executes it), sampling.py (a token from logits), text.py (incremental decoding, stop strings, text in
and out), run.py (`llmcli generate`)."""
