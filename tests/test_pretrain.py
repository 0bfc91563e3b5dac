import json
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import craft
from conftest import run
from model import GPT


def test_pack_places_every_sequence_once_and_overfills_no_row():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(200)]
    rows = craft.pack(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= 1.25 * sum(lengths) / 64 + 1  # first-fit decreasing wastes little


def test_the_packed_loss_is_the_loss_of_one_trace_a_row():
    cfg = replace(craft.PRESETS["micro"], batch_size=12)
    torch.manual_seed(0)
    model = GPT(cfg.gpt(craft.ENC.n_vocab))
    x, y, doc = craft.pretraining_batch(cfg, step=3)
    packed = model(x, y, doc=doc)[1]
    total, n = 0.0, 0  # brute force: every trace alone, its own positions from 0
    for s in craft.pretraining_traces(cfg, step=3):
        s = torch.tensor(s)[None]
        logits = model(s[:, :-1])[0]
        total += F.cross_entropy(logits[0], s[0, 1:], reduction="sum")
        n += s.size(1) - 1
    assert int((y >= 0).sum()) == n and x.size(1) == cfg.block_size
    assert torch.allclose(packed, total / n, atol=1e-5)


def test_each_shipped_base_was_trained_on_this_world_with_its_preset():
    """A change to the world or to a preset's pretraining fields fails here until the base is
    retrained: python craft.py pretrain --preset=P [--seed=S] --out=out/P --ship."""
    for preset, seed in (("cpu", 0), ("quick", 0), ("quick", 1), ("quick", 2)):
        ck = craft.load_checkpoint(craft.SHIPPED / craft.shipped_name(preset, seed), "pretrain")
        cfg = craft.replace(craft.PRESETS[preset], seed=seed)
        inputs = json.loads(json.dumps(craft.stage_inputs(cfg, "pretrain")))
        assert json.loads(ck["run"])["inputs"] == inputs, (preset, seed)
    assert len(list(craft.SHIPPED.glob("base_*.pt"))) == 4  # no stale file left behind


def test_a_run_without_a_base_starts_from_the_shipped_one(micro, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(craft, "SHIPPED", tmp_path)
    craft.ship_base(micro, "micro")
    out = tmp_path / "fresh"
    assert run("contrast", "--preset=micro", f"--out={out}") == 0
    assert "the shipped base base_micro.pt has this config" in capsys.readouterr().out
    shipped, trained = (craft.load_checkpoint(d / "pretrain.pt", "pretrain")["model"] for d in (out, micro))
    assert all(torch.equal(shipped[k], trained[k].half().float()) for k in trained)
    assert json.loads((out / "pretrain.json").read_text())["curves"] == json.loads((micro / "pretrain.json").read_text())["curves"]
    # another config finds no shipped base and pretrains
    assert run("contrast", "--preset=micro", "--pretrain_steps=3", f"--out={tmp_path / 'other'}") == 0
    assert "no shipped base has this config, pretraining" in capsys.readouterr().out
    assert "shipped" not in json.loads((tmp_path / "other" / "pretrain.json").read_text())
    with pytest.raises(craft.CraftError, match="differs in pretrain_steps"):  # not the preset's config
        craft.ship_base(tmp_path / "other", "micro")
