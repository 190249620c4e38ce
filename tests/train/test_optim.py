"""train.optimizer=muon: Muon updates exactly the hidden matrices, AdamW everything else."""

import copy

import pytest
import torch

from llmcli.config import TrainConfig
from llmcli.train.optim import MuonAdamW, make_optimizer, set_lr


@pytest.mark.parametrize("family", ["transformer", "value embeddings", "recurrent"])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(family, tiny_model, tiny_recurrent):
    model = {"transformer": lambda: tiny_model(preset="llama"),
             "value embeddings": lambda: tiny_model(preset="llama", value_embeds=1),
             "recurrent": lambda: tiny_recurrent("lstm")}[family]()
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), fused=True)
    muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in optimizer.adamw.param_groups for p in g["params"]}
    assert muon == {id(p) for p in model.hidden_matrices()} and muon
    assert not muon & adamw and muon | adamw == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("embed" not in names[i] and "lm_head" not in names[i] for i in muon)
    assert all(p.dim() == 2 for g in optimizer.muon.param_groups for p in g["params"])
    for name, p in model.named_parameters():  # value-embedding tables and their gates: AdamW
        if name.startswith("value_embeds.") or name.endswith("value_gate"):
            assert id(p) in adamw


def test_a_step_is_muon_on_the_matrices_and_adamw_on_the_rest(tiny_model):
    model = tiny_model(preset="llama", seed=1)
    twin = copy.deepcopy(model)
    t = TrainConfig(optimizer="muon", lr=1e-2, muon_lr=0.05, weight_decay=0.1)
    optimizer = make_optimizer(model, t, fused=False)
    set_lr(optimizer, t.lr)
    matrices = {id(p) for p in twin.hidden_matrices()}
    alone_muon = torch.optim.Muon(twin.hidden_matrices(), lr=0.05, weight_decay=0.1)
    alone_adamw = torch.optim.AdamW([{**g, "params": [p for p in g["params"] if id(p) not in matrices]}
                                     for g in twin.param_groups(0.1)], lr=1e-2, betas=(t.beta1, t.beta2))
    idx = torch.randint(0, 50, (8, 24))
    for m in (model, twin):
        m(idx).logsumexp(-1).mean().backward()
    optimizer.step()
    alone_muon.step()
    alone_adamw.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    # a matrix's update is orthogonalised: its singular values are of one size (Newton-Schulz
    # brings them near 1 without converging exactly), unlike its gradient's
    before = tiny_model(preset="llama", seed=1).blocks[0].attn.q_proj.weight
    update = model.blocks[0].attn.q_proj.weight.detach() - before.detach() * (1 - 0.05 * 0.1)
    singular = torch.linalg.svdvals(update.double())
    gradient = torch.linalg.svdvals(twin.blocks[0].attn.q_proj.weight.grad.double())
    assert singular.max() / singular.median() < 1.6 < gradient.max() / gradient.median()


def test_the_state_round_trips_and_the_schedule_scales_both(tiny_model):
    model = tiny_model(preset="llama")
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), fused=True)
    set_lr(optimizer, 5e-4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 5e-4, 5e-4])
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    optimizer.step()
    again = make_optimizer(model, TrainConfig(optimizer="muon"), fused=True)
    again.load_state_dict(optimizer.state_dict())
    assert isinstance(again, MuonAdamW) and again.muon.state is again.state is again.adamw.state
    assert again.muon.param_groups[0] is again.param_groups[0]
    for p in model.parameters():
        for key, value in optimizer.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(again.state[p][key]))
