import random
from dataclasses import replace

import torch
import torch.nn.functional as F

import craft
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
