"""train.ema_decay and train.average_last: each average equals its formula, swaps in and out of the model
and reloads exactly."""

import torch

from llmcli.train.averaging import SnapshotAverage, WeightAverage, decay_at


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
        average.after_step(step)
    assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(average.average, expected, strict=True))
    live = [p.detach().clone() for p in model.parameters()]
    with average.swapped_in():
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), average.average, strict=True))
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), live, strict=True))
    average.save(tmp_path)
    other = WeightAverage(model, decay=0.8)
    other.load(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(average.average, other.average, strict=True))


def test_the_snapshot_average_is_the_mean_of_the_last_k(tmp_path):
    model = torch.nn.Linear(3, 2)
    average = SnapshotAverage(model, count=3)
    taken = []
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.after_step(1)  # steps between evaluations do not move it
        taken.append([p.detach().clone() for p in model.parameters()])
        average.before_evaluation()
        last = taken[-3:]
        expected = [sum(s[i] for s in last) / len(last) for i in range(2)]
        assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(average.average, expected, strict=True))
    with average.swapped_in():
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), average.average, strict=True))
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), taken[-1], strict=True))
    average.save(tmp_path)
    other = SnapshotAverage(model, count=3)
    other.load(tmp_path)
    assert len(other.snapshots) == 3
    assert all(torch.equal(a, b) for s, t in zip(average.snapshots, other.snapshots, strict=True)
               for a, b in zip(s, t, strict=True))
    other.before_evaluation()  # the next evaluation drops the oldest, as it would have without the reload
    average.before_evaluation()
    assert all(torch.equal(a, b) for a, b in zip(average.average, other.average, strict=True))
