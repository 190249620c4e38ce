"""What the app serves and its load: one `ServerState`, changed on the event loop only."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from llmcli.adapters import Adapters
from llmcli.chat_template import ChatTemplate, JinjaTemplate
from llmcli.constrain.grammar import Grammars
from llmcli.embed import Embedder
from llmcli.serve.engine_loop import EngineLoop, Job
from llmcli.serve.metrics import ServerMetrics
from llmcli.serve.protocol import MAX_BODY_BYTES


@dataclass
class ServerState:
    """What the app serves, and its load (changed on the event loop only)."""

    engine: EngineLoop
    tokenizer: Any  # the request side's own copy (the engine thread decodes with the other)
    eot: int
    model_name: str
    block_size: int | None
    vocab_size: int
    max_batch_size: int
    max_queue: int
    template: ChatTemplate | JinjaTemplate
    grammars: Grammars  # output formats compiled for the (target) vocabulary, shared with the engine
    embedder: Embedder  # /v1/embeddings (on a worker thread, one request at a time)
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    task: str = "lm"  # seq2seq: prompts are sources (`tokenizer` is the source side's)
    source_length: int | None = None  # seq2seq: the most source tokens the encoder takes
    max_prompt_tokens: int | None = None  # what a paged KV cache holds (None: no limit of its own)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)  # the engine loop's own, when it has one
    speculative: bool = False  # the engine decodes speculatively (it refuses a repetition penalty)
    adapters: Adapters | None = None  # LoRA adapters served beside the base (--adapter NAME=RUN)
    created: int = field(default_factory=lambda: int(time.time()))
    embed_lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0  # sequences admitted and not finished
    draining: bool = False
    requests: int = 0

    @property
    def capacity(self) -> int:
        return self.max_batch_size + self.max_queue

    @property
    def model_names(self) -> list[str]:
        """The base's name, then each adapter's."""
        return [self.model_name, *(self.adapters.names if self.adapters is not None else [])]

    def adapter_index(self, name: str | None) -> int:
        """The adapter a request's `model` names (0: the base, also when it names none)."""
        if name is None or name == self.model_name or self.adapters is None:
            return 0
        return self.adapters.index(name)

    def begin_shutdown(self) -> None:
        """From now on new requests get 503 (running ones go on)."""
        self.draining = True

    def release(self, job: Job) -> None:
        self.in_flight -= len(job.sequences)
