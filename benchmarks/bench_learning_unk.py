"""Where the word part of bench_learning.py's gap comes from: each side's valid loss split into the
words its training text never had and the rest, in bits per byte of valid.txt.

llmcli's word tokenizer scores a word it never saw as `<unk>`; the example's vocabulary holds every
word of train, valid and test, so it must predict an unseen word itself from an entry it never
trained. Run on the folder that `bench_learning.py --parts word --keep DIR` kept (its runs, the
example's copy and saved model, the three text files):

    python benchmarks/bench_learning_unk.py DIR
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import table

from llmcli.checkpoint import end_token_ids, load_for_inference
from llmcli.evaluate import _text_file_tokens, chunk_plan
from llmcli.models.base import Rows
from llmcli.tokenizer import UNK, eot_id


def llmcli_losses(work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token nll of word/best on valid.txt, the state carried as `llmcli eval --text-file` does,
    and which targets are `<unk>`."""
    directory, model, tok = load_for_inference(work / "word" / "best", torch.device("cpu"), torch.float32)
    tokens, _, _ = _text_file_tokens(work / "words" / "valid.txt", tok)
    first = (end_token_ids(directory, tok) or (eot_id(tok),))[0]
    seq = np.concatenate([[first], np.asarray(tokens, dtype=np.int64)])
    state = model.new_decode_state(1, dtype=torch.float32, device="cpu")
    nll = []
    with torch.inference_mode():
        for start, stop in chunk_plan(len(seq), model.config.block_size * 8):
            window = torch.from_numpy(seq[start:stop + 1])[None]
            logits = model(window[:, :-1], state=state, rows=Rows([0], [start], [stop - start]))
            nll.append(F.cross_entropy(logits[0].float(), window[0, 1:], reduction="none"))
    return torch.cat(nll), torch.from_numpy(seq[1:]) == tok.token_to_id(UNK)


def example_losses(work: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-token nll of the example's saved model on valid (its evaluate(): 10 columns, bptt 35, the
    hidden state carried), which targets never occur in train.txt, and the bench's scale (all valid
    tokens over those the columns score)."""
    sys.path.insert(0, str(work / "word_language_model"))
    import data as wlm_data  # the example's own corpus reader

    corpus = wlm_data.Corpus(str(work / "words"))
    train_words = {w for line in (work / "words" / "train.txt").open(encoding="utf8") for w in line.split()}
    train_words.add("<eos>")
    unseen = torch.tensor([w not in train_words for w in corpus.dictionary.idx2word])
    net = torch.load(work / "wlm.pt", weights_only=False).eval()
    rows = corpus.valid.numel() // 10
    valid = corpus.valid[:rows * 10].view(10, -1).t().contiguous()
    hidden, losses, masks = net.init_hidden(10), [], []
    with torch.no_grad():
        for i in range(0, rows - 1, 35):
            length = min(35, rows - 1 - i)
            targets = valid[i + 1:i + 1 + length].reshape(-1)
            out, hidden = net(valid[i:i + length], hidden)
            hidden = tuple(h.detach() for h in hidden)
            losses.append(F.cross_entropy(out, targets, reduction="none"))
            masks.append(unseen[targets])
    losses = torch.cat(losses)
    return losses, torch.cat(masks), corpus.valid.numel() / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="the folder bench_learning.py --parts word --keep wrote")
    args = parser.parse_args()
    torch.set_num_threads(2)
    n_bytes = (args.work / "words" / "valid.txt").stat().st_size
    rows = []
    for name, (nll, unseen, scale) in (("llmcli word-lstm", (*llmcli_losses(args.work), 1.0)),
                                       ("word_language_model", example_losses(args.work))):
        bpb = [nll[m].sum().item() * scale / math.log(2) / n_bytes for m in (torch.ones_like(unseen), unseen, ~unseen)]
        rows.append([name, f"{len(nll):,}", f"{bpb[0]:.3f}", f"{int(unseen.sum()):,}",
                     f"{nll[unseen].mean().item():.2f}", f"{bpb[1]:.3f}", f"{bpb[2]:.3f}"])
    table("Valid bits per byte, split at the words the training text never had",
          ["model", "tokens", "bits/byte", "unseen-word tokens", "nats each", "their bits/byte",
           "the rest's bits/byte"], rows)


if __name__ == "__main__":
    main()
