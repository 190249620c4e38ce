"""train.ema_decay: the moving average equals its formula, and swaps in and out of the model."""

import torch

from llmcli.train.averaging import WeightAverage, decay_at


def test_the_average_is_the_hand_computed_one(tmp_path):
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.8)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.8, step / (step + 9))
        assert decay_at(step, 0.8) == d
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters(), strict=True)]
        average.update(step)
    assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(average.average, expected, strict=True))
    live = [p.detach().clone() for p in model.parameters()]
    with average.swapped_in():
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), average.average, strict=True))
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), live, strict=True))
    average.save(tmp_path)
    other = WeightAverage(model, decay=0.8)
    other.load(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(average.average, other.average, strict=True))
