import math
import random
from dataclasses import replace

import torch

import craft
from conftest import run
from data import world
from data.judge import judge
from model import GPT

CFG = replace(craft.PRESETS["micro"], dpo_batch=6)


def tiny(seed):
    torch.manual_seed(seed)
    return GPT(CFG.gpt(craft.ENC.n_vocab)).to(craft.DEVICE)


def logprob_alone(model, text):
    """Brute force: log π(completion | prompt) of one trace run alone, token by token after <|think|>."""
    ids = craft.encode(text)
    start = ids.index(craft.THINK_ID) + 1
    logits = model(torch.tensor([ids]))[0][0]
    return sum(torch.log_softmax(logits[t - 1], -1)[ids[t]] for t in range(start, len(ids)))


def test_the_preference_losses_equal_a_pair_by_pair_computation():
    policy, reference = tiny(0), tiny(1)
    for loss, pairs in (("dpo", "full"), ("ipo", "answer")):
        cfg = replace(CFG, loss=loss, pairs=pairs, dpo_beta=0.5)
        tokens, real, completion = craft.preference_batch(cfg, step=2)
        with torch.no_grad():
            ratio = (craft.sequence_logprobs(policy, tokens, real, completion)
                     - craft.sequence_logprobs(reference, tokens, real, completion))
            chosen, rejected = ratio.chunk(2)
            got = craft.preference_loss(chosen - rejected, loss, cfg.dpo_beta)
            rng = random.Random(f"dpo:{cfg.seed}:2")
            want = []
            for _ in range(cfg.dpo_batch):
                c, r = world.preference_pair(rng, cfg, answer_only=pairs == "answer")
                h = float(logprob_alone(policy, c.text()) - logprob_alone(reference, c.text())
                          - logprob_alone(policy, r.text()) + logprob_alone(reference, r.text()))
                want.append(-math.log(1 / (1 + math.exp(-0.5 * h))) if loss == "dpo" else (h - 1 / (2 * 0.5)) ** 2)
        assert abs(float(got) - sum(want) / len(want)) < 1e-3 * max(1.0, abs(float(got)))


def test_a_step_widens_the_margin_of_chosen_over_rejected():
    """The gradient points the known way: −∂L/∂h > 0 for DPO, and for IPO while h < 1/(2β)."""
    for loss in ("dpo", "ipo"):
        cfg = replace(CFG, loss=loss)
        policy, reference = tiny(0), tiny(0)
        opt = torch.optim.SGD(policy.parameters(), lr=1e-2)
        tokens, real, completion = craft.preference_batch(cfg, step=0)

        def margin():
            with torch.no_grad():
                chosen, rejected = (craft.sequence_logprobs(policy, tokens, real, completion)
                                    - craft.sequence_logprobs(reference, tokens, real, completion)).chunk(2)
            return float((chosen - rejected).mean())
        assert margin() == 0.0  # the policy starts as the reference
        craft.dpo_step(policy, reference, opt, cfg, step=0)
        assert margin() > 0, loss


def test_pairs_differ_where_they_should():
    rng = random.Random(0)
    for _ in range(300):
        for answer_only in (False, True):
            c, r = world.preference_pair(rng, CFG, answer_only)
            assert c.prompt == r.prompt
            vc, vr = judge(c.text().split(world.THINK, 1)[1], c.prompt.kind, c.prompt.answer), \
                judge(r.text().split(world.THINK, 1)[1], r.prompt.kind, r.prompt.answer)
            if c.prompt.kind == "harmful":
                assert (vc.answer, vr.answer) == ("refused", "complied")
                if not answer_only:
                    assert vc.reasoning in ("safe", "rethink") and vr.reasoning == "unsafe"
            else:
                assert (vc.answer, vr.answer) == ("helped-correct", "refused")
            if answer_only or c.prompt.kind != "harmful":
                assert c.steps == r.steps  # the same reasoning: only the answer is compared


def test_dpo_writes_an_evaluable_policy_and_depends_on_pretraining_only(micro, tmp_path):
    for name in ("pretrain.pt", "pretrain.json"):
        (tmp_path / name).write_bytes((micro / name).read_bytes())
    assert run("dpo", "--preset=micro", f"--out={tmp_path}", "--loss=ipo", "--pairs=answer", "--dpo_steps=3") == 0
    assert (tmp_path / "dpo_ipo_answer.pt").is_file()
    policy, _ = craft.load_model(tmp_path / "dpo_ipo_answer.pt")
    assert isinstance(policy, GPT)
    inputs = craft.stage_inputs(CFG, "dpo")
    assert "pretrain_steps" in inputs and "loss" in inputs and "reward" not in inputs and "tau" not in inputs
