"""Hugging Face `transformers` interop: `llmcli export --format hf` and `llmcli import`.

mapping.py (model families, config.json and tensor names, both directions), files.py (the files of
a model folder, helpers both directions use), export.py, importer.py. Everything is plain JSON and
safetensors: `transformers` is needed only to check the result. This file imports nothing.
"""
