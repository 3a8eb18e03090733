"""TD-LoRA (dit/td_lora.py) inside DyDiT: zero at init (outputs unchanged), changes outputs only through the adapter
(backbone frozen and bit-identical, zeroing B restores the base outputs), depends on t through its mixture, the
sliced inference path equals the masked path with the adapter on every family (also with the adapter folded into
the step weights), and save/load round-trips."""
from __future__ import annotations

import json

import pytest
import torch

from dit.dydit import DyDiT, MacCounter
from dit.dydit_io import LORA_NAME, load_dydit, save_dydit
from dit.td_lora import BlockTDLoRA
from test_dydit_families import FAMILIES, base, inputs, partial_routers_

ATOL = 1e-5


def random_lora_(model: DyDiT, seed: int = 2, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in model.lora:
            for p in lora.B.values():
                p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[1] ** 0.5)
            lora.mixer.weight.copy_(torch.randn(lora.mixer.weight.shape, generator=g))


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_zero_at_init(family):
    model = DyDiT.from_dit(base(family)).eval()
    partial_routers_(model)
    x, cond, keep = inputs(family, model.dit, 2)
    with torch.no_grad():
        ref = {mode: model(x, 400, cond, keep, mode=mode).sample for mode in ("masked", "sliced")}
        model.add_td_lora(rank=2, experts=3).eval()
        for lora in model.lora:
            assert all(torch.equal(b, torch.zeros_like(b)) for b in lora.B.values())
        for mode, r in ref.items():
            assert torch.equal(model(x, 400, cond, keep, mode=mode).sample, r), mode


def test_changes_outputs_only_through_the_adapter():
    model = DyDiT.from_dit(base("dit")).frozen_backbone().add_td_lora(rank=2, experts=3)
    backbone = {k: v.clone() for k, v in model.dit.state_dict().items()}
    x, y, _ = inputs("dit", model.dit, 4)
    t = torch.tensor([10, 300, 600, 990])
    model.train()
    model.dit.label_embed.eval()
    with torch.no_grad():
        before = model(x, t, y, mode="complete").sample
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in (*model.routers.parameters(), *model.lora.parameters())}
    opt = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(3):
        loss = (model(x, t, y, mode="complete").sample - 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.dit.state_dict().items():
        assert torch.equal(v, backbone[k]), k  # the backbone never changes
    with torch.no_grad():
        after = model(x, t, y, mode="complete").sample
        assert (after - before).abs().max() > 1e-3  # the adapter moved the output
        for lora in model.lora:
            for b in lora.B.values():
                b.zero_()
        torch.testing.assert_close(model(x, t, y, mode="complete").sample, before, rtol=0, atol=1e-6)


def test_mixture_depends_on_t():
    lora = BlockTDLoRA(64, 256, rank=2, experts=3)
    torch.nn.init.normal_(lora.mixer.weight)
    e = torch.randn(2, 64)
    pi = lora.mixture(e)
    assert torch.allclose(pi.sum(-1), torch.ones(2)) and (pi[0] - pi[1]).abs().max() > 1e-3
    x = torch.randn(2, 5, 64)
    torch.nn.init.normal_(lora.B["fc1"])
    d = lora.delta(x, lora.A["fc1"], lora.B["fc1"], pi)
    # sample 0 with sample 1's mixture gives a different update: the update is a function of t
    d_swapped = lora.delta(x, lora.A["fc1"], lora.B["fc1"], pi.flip(0))
    assert (d[0] - d_swapped[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="rank"):
        BlockTDLoRA(64, 256, rank=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_equals_masked_with_adapter(family):
    model = DyDiT.from_dit(base(family)).add_td_lora(rank=2, experts=3).eval()
    partial_routers_(model)
    random_lora_(model)
    x, cond, keep = inputs(family, model.dit, 4, seed=4, cfg=True)
    with torch.no_grad():
        for t in (50, 500, 950):
            masked = model(x, t, cond, keep, mode="masked")
            counter = MacCounter()
            sliced = model(x, t, cond, keep, mode="sliced", counter=counter)
            torch.testing.assert_close(sliced.sample, masked.sample, rtol=ATOL, atol=ATOL)
            assert counter.adapter > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_steps_equal_the_low_rank_path(family):
    """fold_td_lora: a step's weights with the adapter merged give the low-rank path's output (float32 rounding) at
    a fraction of its counted MACs; with a budget of one step's copies only the first timestep folds, the others keep
    the low-rank path, and a sampling grid over both kinds of step still matches."""
    model = DyDiT.from_dit(base(family)).add_td_lora(rank=2, experts=3).eval()
    partial_routers_(model)
    random_lora_(model)
    x, cond, keep = inputs(family, model.dit, 4, seed=5, cfg=True)
    steps = (950, 500, 50)
    with torch.no_grad():
        model.fold_td_lora(0)
        low, low_macs = {}, {}
        for t in steps:
            counter = MacCounter()
            low[t] = model(x, t, cond, keep, mode="sliced", counter=counter).sample
            low_macs[t] = counter.adapter
            assert all(w.lora is not None for w in model.step_weights(t))
        model.fold_td_lora()
        for t in steps:
            counter = MacCounter()
            out = model(x, t, cond, keep, mode="sliced", counter=counter).sample
            torch.testing.assert_close(out, low[t], rtol=ATOL, atol=ATOL)
            assert all(w.lora is None and w.fold_macs > 0 for w in model.step_weights(t))
            assert 0 < counter.adapter < low_macs[t]  # the merge costs less than the per-token paths, even here
            assert counter.adapter == sum(w.fold_macs for w in model.step_weights(t))
        one_step = sum(w.nbytes() for w in model.step_weights(steps[0]))
        model.fold_td_lora(one_step)
        model.set_sampling_grid(torch.tensor(steps))
        folded = [all(w.lora is None for w in model.step_weights(t)) for t in steps]
        assert folded == [True, False, False]
        for t in steps:
            torch.testing.assert_close(model(x, t, cond, keep, mode="sliced").sample, low[t], rtol=ATOL, atol=ATOL)
        model.clear_sampling_grid()
    with pytest.raises(ValueError, match="max_bytes"):
        model.fold_td_lora(-1)


def test_save_load_round_trip(tmp_path):
    dense = base("pixart")
    dense.save_pretrained(tmp_path / "base")
    model = DyDiT.from_dit(dense).add_td_lora(rank=2, experts=3).eval()
    partial_routers_(model)
    random_lora_(model)
    folder = save_dydit(tmp_path / "dy", model, lam=0.5, base=tmp_path / "base")
    config = json.loads((folder / "dydit_config.json").read_text())
    assert config["td_lora"] == {"rank": 2, "experts": 3, "alpha": 2.0} and config["base_class"] == "PixArtDiT"
    assert (folder / LORA_NAME).is_file() and not (folder / "transformer").exists()
    loaded = load_dydit(folder)
    x, cond, keep = inputs("pixart", dense, 2)
    with torch.no_grad():
        for mode in ("masked", "sliced"):
            torch.testing.assert_close(loaded(x, 700, cond, keep, mode=mode).sample,
                                       model(x, 700, cond, keep, mode=mode).sample, rtol=0, atol=1e-6)
    (folder / LORA_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="TD-LoRA"):
        load_dydit(folder)
