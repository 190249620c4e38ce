"""`llmcli generate`: prompts from the argument, a file or stdin; text streamed, or JSON lines."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import IO

from llmcli import ui
from llmcli.device import configure_threads, select_device, select_dtype
from llmcli.errors import UserError
from llmcli.generate.beam import BeamSearch, BeamSettings
from llmcli.generate.request import FINISH_EOT, FINISH_LENGTH, FINISH_STOP
from llmcli.generate.text import Completion, Generator, StopText, encode_text
from llmcli.io import read_text_file
from llmcli.load import Loaded, load_checkpoint
from llmcli.options.inference import GenerateOptions
from llmcli.tokenizer import decode, eot_id


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
        texts, source = [read_text_file(prompt_file, "prompt file")], str(Path(prompt_file).expanduser())
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
    loaded = load_checkpoint(opts.run_dir, device, select_dtype(opts.dtype, device))
    if opts.beam.beams > 1:
        return _run_beams(opts, loaded, prompts, out, device.type)
    model = loaded.model
    jobs = [(p, j) for p in prompts for j in range(opts.num_samples)]
    speculation = None
    if opts.speculation.enabled:
        from llmcli.generate.speculator import load_speculation

        speculation = load_speculation(opts.speculation, loaded.directory, loaded.tokenizer, device,
                                       select_dtype(opts.dtype, device))
    generator = Generator.of(loaded, max_batch_size=min(opts.batch_size, len(jobs)), speculation=speculation,
                             max_num_batched_tokens=opts.steps.max_num_batched_tokens,
                             compile=opts.steps.compile == "on")
    inputs = {p: encode_text(p, loaded.tokenizer, loaded.source_tokenizer) for p in prompts}
    fmt = opts.constraint.format()
    if fmt is not None:
        generator.grammars.check(fmt)  # compiled (or refused) before anything runs
    ids = []
    for index, (prompt, j) in enumerate(jobs):
        seed = params.seed + j if params.seed is not None else None
        request_id = generator.submit(inputs[prompt], dataclasses.replace(params, seed=seed), fmt)
        dropped = generator.request(request_id).dropped_prompt_tokens
        if dropped and j == 0:
            label = f"prompt {index // opts.num_samples + 1}" if len(prompts) > 1 else "the prompt"
            ui.log(f"warning: {label} is longer than the context window ({model.context_length} "
                   f"tokens); its first {dropped} tokens were dropped")
        ids.append(request_id)
    printer = _Printer(out, generator, ids, [p for p, _ in jobs], json_lines=opts.json_out,
                       stream=not opts.no_stream, echo=not generator.seq2seq, speculative=speculation is not None)
    started = time.perf_counter()
    while generator.has_work():
        printer.take(generator.step())
    printer.take([])
    elapsed = time.perf_counter() - started
    s = generator.engine.stats
    results = printer.results
    total = sum(c.tokens for c in results)
    ui.log(f"{len(results)} sample{'s' if len(results) != 1 else ''}, {total} tokens in {elapsed:.2f}s "
           f"(prefill {ui.format_count(s.prefill_rate)} tok/s, decode {ui.format_count(s.decode_rate)} tok/s, "
           f"batch {generator.engine.max_batch_size}, {device.type})")
    if speculation is not None:
        proposed, accepted = s.proposed_tokens, s.accepted_tokens
        ui.log(f"speculative ({'draft' if speculation.draft is not None else 'prompt lookup'}, "
               f"{speculation.tokens} per round): {accepted}/{proposed} proposed tokens accepted"
               + (f" ({accepted / proposed:.0%})" if proposed else ""))
    return results


def _run_beams(opts: GenerateOptions, loaded: Loaded, prompts: list[str], out: IO[str], device: str
               ) -> list[Completion]:
    """--beams N: the best opts.num_samples hypotheses of each prompt, printed as each prompt's search
    ends (no streaming)."""
    model, tokenizer, params = loaded.model, loaded.tokenizer, opts.sampling
    seq2seq = loaded.source_tokenizer is not None
    eos = -1 if params.ignore_eot or not loaded.end_ids else loaded.end_ids[0]
    search = BeamSearch(model, batch_size=min(opts.batch_size, len(prompts)), beams=opts.beam.beams, eos_id=eos,
                        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True))
    settings = BeamSettings(opts.beam.beams, params.max_new_tokens, length_penalty=_penalty(opts.beam),
                            early_stopping=opts.beam.early_stopping, returns=opts.num_samples)
    inputs = {p: encode_text(p, tokenizer, loaded.source_tokenizer) for p in prompts}
    if seq2seq:
        start = eot_id(tokenizer)  # the decoder starts from <|endoftext|>
        decoder_prompts, sources = [[start]] * len(prompts), [inputs[p] for p in prompts]
    else:
        context = model.context_length
        decoder_prompts, sources = [inputs[p][-(context - 1):] if context else inputs[p] for p in prompts], None
    started = time.perf_counter()
    found = search.run(decoder_prompts, settings, sources)
    results = []
    for prompt, hypotheses in zip(prompts, found, strict=True):
        for h in hypotheses:
            text = StopText(params.stop)
            text.push(decode(tokenizer, h.tokens, skip_special_tokens=True), final=True)
            reason = FINISH_STOP if text.stopped else FINISH_EOT if h.finished else FINISH_LENGTH
            results.append(Completion(id=len(results), completion=text.text, tokens=len(h.tokens) + h.finished,
                                      prompt_tokens=len(inputs[prompt]), dropped_prompt_tokens=0, finish_reason=reason,
                                      seed=0, prefill_tokens_per_second=0.0, decode_tokens_per_second=0.0))
            if opts.json_out:
                key, value = ("source", "target") if seq2seq else ("prompt", "completion")
                row = {key: prompt, value: text.text, "tokens": results[-1].tokens, "score": round(h.score, 4),
                       "logprob": round(h.logprob, 4)}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                out.write(("" if seq2seq else prompt) + text.text + "\n")
    out.flush()
    elapsed = time.perf_counter() - started
    ui.log(f"{len(prompts)} prompt{'s' if len(prompts) != 1 else ''}, {opts.beam.beams} beams, "
           f"{search.tokens} beam tokens in {elapsed:.2f}s "
           f"({ui.format_count(search.tokens / max(elapsed, 1e-9))} tok/s, {device})")
    return results


def _penalty(beam) -> float:
    return 1.0 if beam.length_penalty is None else beam.length_penalty


class _Printer:
    """Prints samples in submission order: the one in front streams, the others wait their turn.
    Without `echo` (seq2seq) a sample is its text alone, one line each."""

    def __init__(self, out: IO[str], generator: Generator, ids: list[int], prompts: list[str], *,
                 json_lines: bool, stream: bool, echo: bool = True, speculative: bool = False):
        self.out, self.generator, self.ids, self.prompts = out, generator, ids, prompts
        self.speculative = speculative
        self.json_lines, self.stream, self.echo = json_lines, stream, echo
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
                if not self.head_started and self.echo:
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
                row = _json(prompt, completion, self.echo)
                if self.speculative:
                    rate = completion.acceptance_rate
                    row["acceptance_rate"] = None if rate is None else round(rate, 4)
                self._write(json.dumps(row, ensure_ascii=False) + "\n")
            elif not self.echo or not (prompt + completion.completion).endswith("\n"):
                self._write("\n")
            self.head, self.head_started = self.head + 1, False

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


def _json(prompt: str, c: Completion, lm: bool = True) -> dict:
    key, value = ("prompt", "completion") if lm else ("source", "target")
    return {key: prompt, value: c.completion, "tokens": c.tokens,
            "prefill_tokens_per_second": round(c.prefill_tokens_per_second, 2),
            "decode_tokens_per_second": round(c.decode_tokens_per_second, 2)}
