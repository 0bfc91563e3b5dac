"""The suffix attack (craft.py, Part II): the rows it scores, its one-hot gradient, and its candidates
against a brute-force search over every single-token swap, on the session's micro models."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

import craft
from conftest import run
from data import world


@pytest.fixture(scope="module")
def models(micro):
    model, _ = craft.load_model(micro / "pretrain.pt", "pretrain")
    return model, craft.load_compass(micro / "contrast.pt")


def some(n, seed=0):
    rng = random.Random(seed)
    vocab = craft.suffix_vocabulary().tolist()
    prompts = [world.harmful_prompt(rng) for _ in range(n)]
    return prompts, [rng.sample(vocab, craft.SUFFIX_LEN) for _ in range(n)]


def test_a_row_is_the_prompt_with_the_suffix_as_text_then_the_forced_start():
    prompts, suffixes = some(20)
    for p, suffix in zip(prompts, suffixes):
        tokens, real, cols, target = craft.attack_rows([p], [suffix])
        start = craft.encode(" " + world.unsafe_prefix(p))
        as_text = craft.encode_prompt(p.text + craft.ENC.decode(suffix))  # what eval will feed in
        assert tokens[0].tolist() == as_text + start and real.all()
        assert tokens[0, cols[0]].tolist() == suffix
        assert tokens[0, 1:][target[0]].tolist() == start  # the actions the loss scores
    tokens, real, cols, target = craft.attack_rows(prompts[:3], suffixes[:2])  # 6 rows, left-padded
    assert tokens.shape[0] == 6 and all(tokens[i, cols[i]].tolist() == suffixes[i // 3] for i in range(6))


@pytest.mark.parametrize("objective", craft.OBJECTIVES)
def test_the_one_hot_gradient_equals_autograd_through_a_one_hot_embedding(models, objective):
    model, compass = models
    prompts, (suffix, *_) = some(4)
    loss, grad = craft.attack_loss(model, compass, prompts, [suffix], objective, grad=True)
    wte, one_hot = model.transformer.wte, []

    def embed_one_hot(module, args, out):  # the same embeddings, as one_hot @ W_e
        one_hot.append(F.one_hot(args[0], module.num_embeddings).float().requires_grad_())
        return one_hot[-1] @ module.weight

    handle = wte.register_forward_hook(embed_one_hot)
    try:
        again = craft.attack_loss(model, compass, prompts, [suffix], objective)
        (d,) = torch.autograd.grad(again.sum(), one_hot[0])
    finally:
        handle.remove()
    _, _, cols, _ = craft.attack_rows(prompts, [suffix])
    expected = torch.stack([d[i, cols[i]] for i in range(len(prompts))]).sum(0)  # (k, V)
    assert torch.allclose(again, loss) and torch.allclose(grad, expected, atol=1e-5)


def test_the_gradient_proposes_the_best_swap_that_brute_force_finds(models):
    """Try every allowed token at every position; the best swap should be among the gradient's
    TOP_K guesses at its position. The gradient is a first-order guess, so not every position's own
    best is: we ask for the overall best, and for most positions' best to rank in the top 10%."""
    model, compass = models
    prompts, (suffix, *_) = some(4, seed=1)
    vocab = craft.suffix_vocabulary()
    _, grad = craft.attack_loss(model, compass, prompts, [suffix], "jailbreak", grad=True)
    ranks, best = [], (float("inf"), None)
    for i in range(craft.SUFFIX_LEN):
        swaps = [suffix[:i] + [t] + suffix[i + 1:] for t in vocab.tolist()]
        with torch.no_grad():
            loss = torch.cat([craft.attack_loss(model, compass, prompts, s, "jailbreak")
                              for s in craft.in_batches(swaps, 256)])
        winner = int(loss.argmin())
        ranks.append(int((grad[i, vocab] < grad[i, vocab[winner]]).sum()))  # 0 = the gradient's first guess
        best = min(best, (float(loss[winner]), i, winner))
    _, i, winner = best
    assert ranks[i] < craft.TOP_K
    assert sum(r < 0.1 * len(vocab) for r in ranks) > craft.SUFFIX_LEN / 2, ranks


def test_attack_writes_its_json_and_the_suffix_is_fed_as_text(micro, tmp_path, monkeypatch):
    monkeypatch.setattr(craft, "ATTACK_STEPS", 2)
    for name in ("pretrain.pt", "contrast.pt"):
        (tmp_path / name).write_bytes((micro / name).read_bytes())
    assert run("attack", "--preset=micro", f"--out={tmp_path}", "--objective=obfuscate") == 0
    m = json.loads((tmp_path / "attack_pretrain_obfuscate.json").read_text())
    for key in ("asr_before", "asr_after", "monitor_recall", "monitor_recall_before"):
        k, n = m["counts"][key]
        assert 0 <= m[key] == k / max(n, 1) <= 1 and len(m["ci95"][key]) == 2
    assert m["counts"]["asr_after"][1] == craft.PRESETS["micro"].eval_rows == sum(m["outcomes_after"].values())
    assert len(m["loss_curve"]) == 2 and m["loss_curve"][1] <= m["loss_curve"][0]
    assert craft.ENC.encode_ordinary(m["suffix"]) == m["suffix_ids"]
