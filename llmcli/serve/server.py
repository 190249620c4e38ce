"""`llmcli serve`: a checkpoint loaded, a socket bound, uvicorn running until Ctrl-C.

The first Ctrl-C (or SIGTERM) turns new requests away with 503 and gives running ones
SHUTDOWN_GRACE_SECONDS to finish.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from llmcli import ui
from llmcli.chat_template import load_chat_template
from llmcli.constrain.grammar import Grammars
from llmcli.device import configure_threads, select_device, select_dtype
from llmcli.embed import Embedder
from llmcli.errors import UserError
from llmcli.generate.outputs import CacheUse
from llmcli.generate.text import Generator
from llmcli.load import load_checkpoint
from llmcli.options.inference import API_KEY_ENV, ServeOptions, parse_size
from llmcli.serve.app import create_app
from llmcli.serve.engine_loop import EngineLoop
from llmcli.serve.metrics import ServerMetrics
from llmcli.serve.protocol import MAX_BODY_BYTES
from llmcli.serve.state import ServerState
from llmcli.tokenizer import eot_id

SHUTDOWN_GRACE_SECONDS = 10
MAX_NUM_BATCHED_TOKENS = 512  # serve's default step budget (chunked prefill); docs/benchmarks.md


def default_model_name(run_dir: str | Path) -> str:
    """The run directory's name; `runs/char/best` gives `char/best`."""
    path = Path(run_dir).expanduser().resolve()
    if path.name in ("best", "last") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def _model_name(opts: ServeOptions) -> str:
    return opts.model_name if opts.model_name is not None else default_model_name(opts.run_dir)


def engine_options(model: Any, opts: ServeOptions) -> dict[str, Any]:
    """The engine's options: its step budget (--max-num-batched-tokens), whether its decode step is
    compiled (--compile; auto: where the family has a compiled step) and its KV cache."""
    from llmcli.generate.compiled import compiles

    steps = opts.steps
    budget = steps.max_num_batched_tokens or max(MAX_NUM_BATCHED_TOKENS, opts.max_batch_size)
    compile = steps.compile == "on" or (steps.compile == "auto" and compiles(model))
    return {"max_num_batched_tokens": budget, "compile": compile, **cache_options(model, opts)}


def cache_options(model: Any, opts: ServeOptions) -> dict[str, Any]:
    """The engine's KV cache: paged where the family pages (by default as much memory as
    --max-batch-size full-context slots), else the family's own state per slot."""
    if opts.slot_cache or (not model.pages_decode_state and not opts.paging_options):
        return {}
    if not model.pages_decode_state:
        raise UserError(f"model.arch={model.config.arch} has no paged KV cache (its decode state is a fixed size "
                        "per sequence): drop --num-blocks, --kv-cache-memory, --block-size and --no-prefix-cache")
    per_block = opts.block_tokens * model.kv_bytes_per_token(next(model.parameters()).dtype)
    if opts.num_blocks is not None:
        blocks = opts.num_blocks
    elif opts.kv_cache_memory is not None:
        blocks = parse_size(opts.kv_cache_memory) // per_block
        if blocks < 1:
            raise UserError(f"--kv-cache-memory {opts.kv_cache_memory} holds no block: one of {opts.block_tokens} "
                            f"tokens takes {ui.format_bytes(per_block)} for this model")
    else:
        blocks = opts.max_batch_size * math.ceil(model.context_length / opts.block_tokens)
    return {"kv_blocks": blocks, "block_len": opts.block_tokens, "prefix_cache": not opts.no_prefix_cache}


def cache_summary(use: CacheUse) -> str:
    """The engine's KV cache in words, for the banner."""
    if not use.paged:
        return f"{use.slots_total} KV-cache slots"
    prefix = "prefix caching on" if use.prefix_caching else "no prefix caching"
    return f"KV cache {use.blocks_total} blocks of {use.block_tokens} tokens, {prefix}"


def build_state(model: Any, tokenizer: Any, opts: ServeOptions, template: Any = None, *,
                max_body_bytes: int = MAX_BODY_BYTES, stop_token_ids: Sequence[int] | None = None,
                source_tokenizer: Any = None, speculation: Any = None, adapters: Any = None) -> ServerState:
    """Everything a server needs for a loaded model (the engine thread starts with the app).

    `template` defaults to the one `opts.chat_template` names; `stop_token_ids` to <|endoftext|>. A
    seq2seq model's prompts are its sources, encoded with `source_tokenizer` (default: the shared
    `tokenizer`). `speculation` (speculator.Speculation) decodes speculatively. `adapters`
    (llmcli.adapters.Adapters, already wrapped into `model`) are served beside the base; blocks are
    then not shared between prompts (the same prefix has other keys under another adapter).
    """
    metrics = ServerMetrics(speculative=speculation is not None)
    options = engine_options(model, opts)
    if adapters is not None and "prefix_cache" in options:
        options["prefix_cache"] = False
    grammars = Grammars(tokenizer, stop_token_ids[0] if stop_token_ids else eot_id(tokenizer))
    engine = EngineLoop(lambda: Generator(model, tokenizer, max_batch_size=opts.max_batch_size,
                                          source_tokenizer=source_tokenizer, stop_token_ids=stop_token_ids,
                                          speculation=speculation, grammars=grammars, **options),
                        metrics)
    name = _model_name(opts)
    seq2seq = model.task == "seq2seq"
    prompts = source_tokenizer or tokenizer if seq2seq else tokenizer  # what requests encode with
    # what an empty prompt starts from
    eot = stop_token_ids[0] if stop_token_ids and not seq2seq else eot_id(prompts)
    embedder = Embedder(model, Tokenizer.from_str(prompts.to_str()))
    return ServerState(engine=engine, tokenizer=Tokenizer.from_str(prompts.to_str()), eot=eot,
                       embedder=embedder, adapters=adapters,
                       model_name=name, block_size=model.context_length,
                       vocab_size=prompts.get_vocab_size(with_added_tokens=True),
                       max_batch_size=opts.max_batch_size, max_queue=opts.max_queue,
                       template=template if template is not None else load_chat_template(opts.chat_template),
                       grammars=grammars,
                       api_key=opts.api_key, max_body_bytes=max_body_bytes, task=model.task,
                       source_length=model.source_length, metrics=metrics, speculative=speculation is not None,
                       max_prompt_tokens=_pool_tokens(engine.stats.cache))


def _pool_tokens(use: CacheUse) -> int | None:
    """The most tokens a paged cache holds (None: a slot cache, no limit of its own)."""
    return use.blocks_total * use.block_tokens if use.paged else None


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line UserError (address in use, unknown host...)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    # proto must say TCP: asyncio turns Nagle's algorithm off (TCP_NODELAY) only for sockets that
    # do, and with it on, every streamed chunk after the first waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "the address is already in use" if exc.errno in (98, 48, 10048) else (exc.strerror or str(exc))
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def make_uvicorn_server(app: Any, *, log_level: str = "info", access_log: bool = True):
    """A uvicorn.Server that drains on the first Ctrl-C (or SIGTERM): it keeps accepting, answers
    new requests 503, and stops once the running ones finish or SHUTDOWN_GRACE_SECONDS pass. A second
    Ctrl-C stops it at once."""
    import uvicorn

    state = app.state.llm

    class Server(uvicorn.Server):
        drain_started: float | None = None

        def handle_exit(self, sig, frame) -> None:
            if self.drain_started is not None:
                super().handle_exit(sig, frame)
                return
            state.begin_shutdown()
            self.drain_started = time.monotonic()

        async def on_tick(self, counter: int) -> bool:
            if self.drain_started is not None and (state.in_flight == 0
                                                   or time.monotonic() - self.drain_started > SHUTDOWN_GRACE_SECONDS):
                self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=1, server_header=False)
    return Server(config)


def serve_command(opts: ServeOptions) -> None:
    """Load the checkpoint, bind, serve until Ctrl-C; a bad template, RUN_DIR or address fails first."""
    if opts.engine == "vllm":
        from llmcli.serve.vllm import serve_with_vllm

        return serve_with_vllm(opts, _model_name(opts))
    device = select_device(opts.device)
    configure_threads(opts.threads)
    sock = bind_socket(opts.host, opts.port)
    try:
        loaded = load_checkpoint(opts.run_dir, device, select_dtype(opts.dtype, device),
                                 chat_template=opts.chat_template)
        template = loaded.chat_template  # a bad template fails here, before any request
        speculation = _speculation(opts, loaded.directory, loaded.tokenizer, device)
        adapters = _adapters(opts, loaded.model, loaded.directory, device)
        state = build_state(loaded.model, loaded.tokenizer, opts, template, stop_token_ids=loaded.end_ids,
                            source_tokenizer=loaded.source_tokenizer, speculation=speculation, adapters=adapters)
        warm_up(state)
        _announce(opts, state, sock, loaded.parameters, device)
        server = make_uvicorn_server(create_app(state))
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled: we are done
            server.run(sockets=[sock])
    finally:
        sock.close()


def warm_up(state: ServerState) -> None:
    """Compile the decode step's batch shapes before uvicorn accepts a request (so /health answers
    only once they are ready, and no client waits for a compile), and say what it took."""
    buckets = state.engine.compiled_buckets
    if buckets:
        ui.log(f"compiling the decode step for batch {', '.join(map(str, buckets))} before serving "
               "(--compile off skips it)")
        ui.log(state.engine.warm_up().summary())


def _speculation(opts: ServeOptions, directory: Path, tokenizer: Any, device: torch.device):
    """--draft / --prompt-lookup loaded and checked as `generate` does; None without them."""
    if not opts.speculation.enabled:
        return None
    from llmcli.generate.speculator import load_speculation

    return load_speculation(opts.speculation, directory, tokenizer, device, select_dtype(opts.dtype, device))


def _adapters(opts: ServeOptions, model: Any, directory: Path, device: torch.device):
    """--adapter NAME=RUN ... loaded onto the base (None without them)."""
    if not opts.adapters:
        return None
    from llmcli.adapters import AdapterSpec, load_adapters

    if model.task == "seq2seq":
        raise UserError("--adapter: several adapters are served on a language model; this one is a "
                        f"model.arch={model.config.arch} sequence-to-sequence model")
    specs = [AdapterSpec.parse(text) for text in opts.adapters]
    if _model_name(opts) in [s.name for s in specs]:
        raise UserError(f"--adapter {_model_name(opts)}=...: that is the base model's name (see --model-name)")
    return load_adapters(model, directory, specs, device, select_dtype(opts.dtype, device))


def _announce(opts: ServeOptions, state: ServerState, sock: socket.socket, parameters: int,
              device: torch.device) -> None:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    ui.log(f"serving {state.model_name} ({ui.format_count(parameters)} parameters, context {state.block_size or 'unlimited'}, "
           f"{device.type}) at http://{shown}:{port}/v1 - batch {opts.max_batch_size}, queue "
           f"{opts.max_queue}, {cache_summary(state.engine.stats.cache)}, API key {'required' if opts.api_key else 'off'}; Ctrl-C stops")
    if state.adapters is not None:
        ui.log(f"adapters: {', '.join(state.adapters.names)} (a request's model picks one; they share batches)")
    spec = opts.speculation
    if spec.enabled:
        source = f"draft {spec.draft}" if spec.draft is not None else f"prompt lookup (n={spec.prompt_lookup})"
        ui.log(f"speculative decoding on: {source} proposes {spec.draft_tokens} tokens per round; the running "
               "sequences are verified together")
    if opts.api_key is None and not _is_loopback(host):
        ui.log(f"warning: listening on {opts.host} without an API key: anyone who can reach this port can use "
               f"the model (set {API_KEY_ENV})")
