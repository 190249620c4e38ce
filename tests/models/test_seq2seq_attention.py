"""The sequence-to-sequence families' attention maps: the weights their own forward computes
(checked against softmax(q k^T / sqrt(d)) by hand, with the masks, from the projections the
normal forward made), rows that sum to 1, padding and the causal mask respected, and logits that
the recording path leaves unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmcli.models.seq2seq_state import CROSS, DECODER_SELF, ENCODER_SELF
from tests.conftest import SEQ2SEQ_ARCHES

SOURCE, DECODER = torch.tensor([[5, 9, 3, 12, 7, 1, 0]]), torch.tensor([[0, 4, 8, 2, 6]])  # S = 7, T = 5


def softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def capture(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, list[np.ndarray]], list]:
    """Forward hooks keeping each module's outputs (as float64 arrays), by name."""
    seen: dict[str, list[np.ndarray]] = {name: [] for name in modules}

    def keep(name):
        def hook(module, args, out):
            seen[name].append((out[0] if isinstance(out, tuple) else out).detach().double().numpy())
        return hook

    return seen, [m.register_forward_hook(keep(name)) for name, m in modules.items()]


def hand_attention(q: np.ndarray, k: np.ndarray, heads: int, causal: bool) -> np.ndarray:
    """softmax(q k^T / sqrt(head_dim)) per head from projections q [T, d], k [S, d]."""
    q, k = (x.reshape(len(x), heads, -1).transpose(1, 0, 2) for x in (q, k))
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape[1:], dtype=bool)), scores, -np.inf)
    return softmax(scores)


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_encoder_decoder_maps_are_what_its_forward_computes(tiny_seq2seq, placement):
    model = tiny_seq2seq("encoder-decoder", std=0.3, norm_placement=placement)
    attentions = {f"{side}.{i}.{kind}": getattr(layer, kind) for side in ("encoder", "decoder")
                  for i, layer in enumerate(getattr(model, side))
                  for kind in (("self_attn",) if side == "encoder" else ("self_attn", "cross_attn"))}
    seen, hooks = capture({f"{name}.{p}": getattr(a, p) for name, a in attentions.items() for p in ("q_proj", "k_proj")})
    with torch.no_grad():
        model(DECODER, source=SOURCE)  # the fused (SDPA) forward
    for hook in hooks:
        hook.remove()
    maps = {m.name: m for m in model.attention_maps(SOURCE, DECODER)}
    assert list(maps) == [ENCODER_SELF, DECODER_SELF, CROSS]
    assert [(m.queries, m.keys) for m in maps.values()] == [
        (("text",), ("text",)), (("generated",), ("decoder input",)), (("generated",), ("text",))]
    shapes = {ENCODER_SELF: (2, 4, 7, 7), DECODER_SELF: (2, 4, 5, 5), CROSS: (2, 4, 5, 7)}
    for name, m in maps.items():
        assert m.weights.shape == shapes[name] and m.weights.dtype == torch.float32
        torch.testing.assert_close(m.weights.sum(-1), torch.ones(shapes[name][:3]), rtol=0, atol=1e-5)
    assert (maps[DECODER_SELF].weights.triu(1) == 0).all()  # no step sees a later target token
    for i in range(2):
        for name, key, causal in ((ENCODER_SELF, f"encoder.{i}.self_attn", False),
                                  (DECODER_SELF, f"decoder.{i}.self_attn", True),
                                  (CROSS, f"decoder.{i}.cross_attn", False)):
            expected = hand_attention(seen[f"{key}.q_proj"][0][0], seen[f"{key}.k_proj"][0][0], 4, causal)
            np.testing.assert_allclose(maps[name].weights[i].double().numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["gru-seq2seq", "lstm-seq2seq"])
def test_recurrent_maps_are_its_attention_over_the_encoder_states(tiny_seq2seq, arch):
    """Luong's general score h_t . W_a m_s, softmaxed over the source: one layer, one head."""
    model = tiny_seq2seq(arch, std=0.3)
    seen, hooks = capture({"decoder": model.decoder, "keys": model.attn_key})
    with torch.no_grad():
        model(DECODER, source=SOURCE)
    for hook in hooks:
        hook.remove()
    (m,) = model.attention_maps(SOURCE, DECODER)
    assert (m.name, m.queries, m.keys, m.weights.shape) == (CROSS, ("generated",), ("text",), (1, 1, 5, 7))
    torch.testing.assert_close(m.weights.sum(-1), torch.ones(1, 1, 5), rtol=0, atol=1e-5)
    expected = softmax(seen["decoder"][0][0] @ seen["keys"][0][0].T)
    np.testing.assert_allclose(m.weights[0, 0].double().numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHES)
def test_recording_keeps_the_logits_and_masks_the_padding(tiny_seq2seq, arch):
    """A padded batch through the recording path: the normal forward's logits; no weight on a
    padded source position; each row's weights as the row alone gives them."""
    model = tiny_seq2seq(arch, std=0.3)
    source = torch.tensor([[5, 9, 3, 12, 7, 1, 0], [4, 2, 0, 8, 8, 8, 8]])
    lengths = torch.tensor([7, 3])
    decoder = torch.tensor([[0, 4, 8, 2, 6], [0, 3, 3, 1, 9]])
    record: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        recorded = model(decoder, source=source, source_lengths=lengths, record=record)
        fused = model(decoder, source=source, source_lengths=lengths)
    torch.testing.assert_close(recorded, fused, rtol=0, atol=1e-5)
    alone = {m.name: m.weights for m in model.attention_maps(source[1:, :3], decoder[1:])}
    assert set(record) == set(alone)
    for name, weights in record.items():
        assert len(weights) == alone[name].shape[0]
        for layer, w in enumerate(weights):
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:3]), rtol=0, atol=1e-5)
            if name != DECODER_SELF:  # keys over the source: nothing on its padding
                assert (w[1, :, :, 3:] == 0).all()
                w = w[..., :3, :3] if name == ENCODER_SELF else w[..., :3]
            torch.testing.assert_close(w[1], alone[name][layer], rtol=0, atol=1e-5)


def test_maps_need_one_sequence_and_the_decoders_inputs(tiny_seq2seq):
    model = tiny_seq2seq()
    with pytest.raises(ValueError, match="one sequence"):
        model.attention_maps(SOURCE.repeat(2, 1), DECODER.repeat(2, 1))
    with pytest.raises(ValueError, match="decoder's inputs"):
        model.attention_maps(SOURCE)
