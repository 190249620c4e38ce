"""`llmcli generate`: prompts from the argument, a file or stdin; text streamed, or JSON lines."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import IO

from llmcli import ui
from llmcli.checkpoint import end_token_ids, load_for_inference
from llmcli.device import configure_threads, select_device, select_dtype
from llmcli.errors import UserError
from llmcli.generate.text import Completion, Generator, encode_prompt
from llmcli.options import GenerateOptions


def generate_command(opts: GenerateOptions) -> None:
    prompts = read_prompts(opts.prompt, opts.prompt_file, opts.lines)
    configure_threads(opts.threads)
    run_generate(opts, prompts)


def read_prompts(prompt: str | None, prompt_file: Path | None, lines: bool,
                 stdin: IO[str] | None = None) -> list[str]:
    """Prompts from the argument, a file or stdin; one per non-blank line with `lines`."""
    if prompt is not None and prompt_file is not None:
        raise UserError("give a PROMPT or --prompt-file, not both")
    if prompt is not None:
        texts, source = [prompt], None
    elif prompt_file is not None:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise UserError(f"prompt file not found: {path}")
        try:
            texts, source = [path.read_text(encoding="utf-8")], str(path)
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
    else:
        stdin = stdin or sys.stdin
        if stdin.isatty():
            ui.log("reading the prompt from stdin; end it with Ctrl-D (or pass \"\" to start from "
                   "<|endoftext|>)")
        texts, source = [stdin.read()], "stdin"
    if lines:
        texts = [line for line in texts[0].splitlines() if line.strip()]
    if source is not None and not any(texts):
        raise UserError(f"no prompt: {source} is empty" + (" (or has only blank lines)" if lines else ""))
    return texts



def run_generate(opts: GenerateOptions, prompts: list[str], out: IO[str] | None = None) -> list[Completion]:
    """Generate `opts.num_samples` completions per prompt and print them in order.

    Text mode prints each prompt followed by its completion, streaming the sample in front as it
    is produced (unless `no_stream`), with a `---` line between samples. JSON mode prints one
    object per sample. With a seed, sample j of every prompt uses seed + j.
    """
    out = out or sys.stdout
    params = opts.sampling
    device = select_device(opts.device)
    directory, model, tokenizer = load_for_inference(opts.run_dir, device, select_dtype(opts.dtype, device))
    jobs = [(p, j) for p in prompts for j in range(opts.num_samples)]
    generator = Generator(model, tokenizer, max_batch_size=min(opts.batch_size, len(jobs)),
                          stop_token_ids=end_token_ids(directory, tokenizer))
    ids = []
    for index, (prompt, j) in enumerate(jobs):
        seed = params.seed + j if params.seed is not None else None
        request_id = generator.submit(encode_prompt(tokenizer, prompt), dataclasses.replace(params, seed=seed))
        dropped = generator.request(request_id).dropped_prompt_tokens
        if dropped and j == 0:
            label = f"prompt {index // opts.num_samples + 1}" if len(prompts) > 1 else "the prompt"
            ui.log(f"warning: {label} is longer than the context window ({model.context_length} "
                   f"tokens); its first {dropped} tokens were dropped")
        ids.append(request_id)
    printer = _Printer(out, generator, ids, [p for p, _ in jobs], json_lines=opts.json_out,
                       stream=not opts.no_stream)
    started = time.perf_counter()
    while generator.has_work():
        printer.take(generator.step())
    printer.take([])
    elapsed = time.perf_counter() - started
    s = generator.engine.stats
    results = printer.results
    total = sum(c.tokens for c in results)
    prefill = s["prefill_tokens"] / s["prefill_seconds"] if s["prefill_seconds"] else 0.0
    decode = s["decode_tokens"] / s["decode_seconds"] if s["decode_seconds"] else 0.0
    ui.log(f"{len(results)} sample{'s' if len(results) != 1 else ''}, {total} tokens in {elapsed:.2f}s "
           f"(prefill {ui.format_count(prefill)} tok/s, decode {ui.format_count(decode)} tok/s, "
           f"batch {generator.engine.max_batch_size}, {device.type})")
    return results


class _Printer:
    """Prints samples in submission order: the one in front streams, the others wait their turn."""

    def __init__(self, out: IO[str], generator: Generator, ids: list[int], prompts: list[str], *,
                 json_lines: bool, stream: bool):
        self.out, self.generator, self.ids, self.prompts = out, generator, ids, prompts
        self.json_lines, self.stream = json_lines, stream
        self.styled = ui.interactive(ui.stdout) and not json_lines
        self.texts: dict[int, list[str]] = {i: [] for i in ids}
        self.finished: set[int] = set()
        self.head, self.head_started = 0, False
        self.results: list[Completion] = []

    def take(self, events) -> None:
        for ev in events:
            self.texts[ev.id].append(ev.text)
            if ev.finished:
                self.finished.add(ev.id)
        while self.head < len(self.ids):
            request_id, prompt = self.ids[self.head], self.prompts[self.head]
            done = request_id in self.finished
            if not self.json_lines and (self.stream or done):
                if not self.head_started:
                    self._write("---\n" if self.head > 0 else "")
                    self._write(f"\x1b[1m{prompt}\x1b[0m" if self.styled and prompt else prompt)
                    self.head_started = True
                self._write("".join(self.texts[request_id]))
                self.texts[request_id].clear()
            if not done:
                return
            completion = self.generator.completion(request_id)
            self.results.append(completion)
            if self.json_lines:
                self._write(json.dumps(_json(prompt, completion), ensure_ascii=False) + "\n")
            elif not (prompt + completion.completion).endswith("\n"):
                self._write("\n")
            self.head, self.head_started = self.head + 1, False

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


def _json(prompt: str, c: Completion) -> dict:
    return {"prompt": prompt, "completion": c.completion, "tokens": c.tokens,
            "prefill_tokens_per_second": round(c.prefill_tokens_per_second, 2),
            "decode_tokens_per_second": round(c.decode_tokens_per_second, 2)}
