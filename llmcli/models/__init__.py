"""Model families behind one interface (base.py); registry.py builds one from a config's `model.arch`.

Models know nothing of checkpoints, quantization, generation or serving: those work on any family
through `LanguageModel`'s methods.
"""
