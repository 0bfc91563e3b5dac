import torch
import torch.nn.functional as F

import craft
from craft import SAFE, UNSAFE


def supcon_double_loop(z, labels, tau):
    """The SupCon equation written as explicit sums over anchors, positives and the denominator."""
    total, anchors = 0.0, 0
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(torch.exp(z[i] @ z[a] / tau) for a in range(len(z)) if a != i)
        total = total - sum(torch.log(torch.exp(z[i] @ z[p] / tau) / denominator) for p in positives) / len(positives)
        anchors += 1
    return total / anchors


def test_supcon_equals_the_double_loop_in_value_and_gradient():
    torch.manual_seed(0)
    raw = torch.randn(12, 5, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 0, 1, 2, 2, 0, 3])  # label 3 has no positive: skipped
    fast = craft.supcon_loss(F.normalize(raw, dim=1), labels, 0.2)
    (g_fast,) = torch.autograd.grad(fast, raw)
    slow = supcon_double_loop(F.normalize(raw, dim=1), labels, 0.2)
    (g_slow,) = torch.autograd.grad(slow, raw)
    assert torch.allclose(fast, slow, atol=1e-5) and torch.allclose(g_fast, g_slow, atol=1e-5)


def test_auroc_equals_counting_pairs():
    torch.manual_seed(0)
    s = torch.randint(0, 5, (40,)).float()  # many ties
    pos = torch.rand(40) > 0.5
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in s[pos] for b in s[~pos]]
    assert abs(craft.auroc(s, pos) - sum(pairs) / len(pairs)) < 1e-6


def synthetic_taps(n=400, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    step = torch.tensor([SAFE, UNSAFE] * (n // 2))
    centre = torch.randn(dim, generator=g)
    h = torch.randn(n, dim, generator=g) + torch.where(step[:, None] == SAFE, centre, -centre)
    return craft.Taps({1: h}, step, step.clone(), torch.zeros(n, dtype=torch.long))


def test_two_clusters_become_separable():
    cfg = craft.PRESETS["micro"]
    taps = synthetic_taps()
    compass = craft.train_compass(cfg, taps, 1)
    assert craft.auroc(craft.token_scores(compass, taps), taps.step == SAFE) > 0.95


def test_score_has_the_right_sign():
    """Hand-made: prototypes e1 (safe) and e2 (unsafe); z = e1 scores 1 − 0 = +1, z = e2 scores −1."""
    compass = craft.Compass(4, 3, layer=1)
    compass.prototypes[SAFE] = torch.tensor([1.0, 0, 0])
    compass.prototypes[UNSAFE] = torch.tensor([0, 1.0, 0])
    z = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    assert compass.score(z).tolist() == [1.0, -1.0, 0.0]


def test_margin_loss_is_zero_when_classes_are_far_apart():
    labels = torch.tensor([SAFE, SAFE, UNSAFE, UNSAFE])
    apart = torch.tensor([[1.0, 0], [1.0, 0], [-1.0, 0], [-1.0, 0]])
    assert craft.margin_loss(apart, labels, 0.5) == 0
    mixed = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0]])  # equal class means: every gap is 0
    assert torch.isclose(craft.margin_loss(mixed, labels, 0.5), torch.tensor(0.5))


def test_step_by_step_encoding_equals_whole_text():
    import random
    from data import world
    rng = random.Random(0)
    for kind in ("safe", "unsafe", "rethink"):
        t = world.harmful_trace(rng, world.harmful_prompt(rng, world.TRAIN_WRAPPERS), kind, True)
        ids, labels = craft.token_labels(t)
        assert ids == craft.encode(t.text()) and len(labels) == len(ids)


def test_contrast_checkpoint_reloads_and_reproduces_the_scores(micro):
    import json
    cfg = craft.PRESETS["micro"]
    compass = craft.load_compass(micro / "contrast.pt")
    base, _ = craft.load_model(micro / "pretrain.pt", "pretrain")
    layer = int(compass.layer)
    train = craft.tap_reasoning(base, craft.compass_traces(cfg, "train"), (layer,))
    test = craft.tap_reasoning(base, craft.compass_traces(cfg, "test"), (layer,))
    again = craft.train_compass(cfg, train, layer)
    assert torch.allclose(craft.token_scores(compass, test), craft.token_scores(again, test), atol=1e-6)
    report = json.loads((micro / "contrast.json").read_text())
    assert set(report) >= {"probe_auroc", "chosen_layer", "probe_auroc_per_layer", "linear_probe_auroc_per_layer",
                           "scary_vs_unsafe_auroc", "plan_vs_safety_auroc", "mean_score_per_class"}
    assert report["probe_auroc"] == craft.compass_report(compass, test)["probe_auroc"]
