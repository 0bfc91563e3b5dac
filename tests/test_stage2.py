import dataclasses
import json
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import craft


def gae_loop(rewards, values, mask, gamma, lam):
    """GAE for one row at a time, only over its actions, written as the textbook recursion."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.size(0)):
        steps = [t for t in range(rewards.size(1)) if mask[b, t]]
        a = 0.0
        for j in reversed(range(len(steps))):
            t = steps[j]
            next_value = values[b, steps[j + 1]] if j + 1 < len(steps) else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            a = delta + gamma * lam * a
            adv[b, t] = a
    return adv


def test_gae_equals_a_python_loop():
    torch.manual_seed(0)
    B, T = 4, 9
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, e) in enumerate([(2, 9), (0, 5), (4, 7), (8, 9)]):  # ragged, contiguous action spans
        mask[b, s:e] = True
    rewards, values = torch.randn(B, T) * mask, torch.randn(B, T)
    adv, returns = craft.gae_advantages(rewards, values, mask, 0.9, 0.8)
    assert torch.allclose(adv, gae_loop(rewards, values, mask, 0.9, 0.8), atol=1e-6)
    assert torch.allclose(returns, adv + values)


def process_grpo_loop(rewards, mask, group_size):
    """DeepSeekMath §4.1.3 written out: collect the rewards given in a group (nonzero, or a row's last
    action), normalise them by their mean and unbiased std, then sum each row's from t to the end."""
    adv = torch.zeros_like(rewards)
    for start in range(0, rewards.size(0), group_size):
        given = []
        for b in range(start, start + group_size):
            steps = [t for t in range(rewards.size(1)) if mask[b, t]]
            given += [(b, t) for t in steps if rewards[b, t] != 0 or t == steps[-1]]
        values = torch.tensor([float(rewards[b, t]) for b, t in given])
        mean, std = values.mean(), values.std()
        for b, t in given:
            for u in range(t + 1):
                if mask[b, u]:
                    adv[b, u] += (rewards[b, t] - mean) / (std + 1e-6)
    return adv


def test_process_grpo_equals_a_python_loop():
    torch.manual_seed(0)
    B, T = 6, 8
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, e) in enumerate([(2, 8), (0, 5), (4, 7), (1, 8), (3, 6), (0, 8)]):
        mask[b, s:e] = True
    rewards = torch.randn(B, T) * mask * (torch.rand(B, T) < 0.6)  # sparse: some actions get nothing
    assert torch.allclose(craft.process_advantages(rewards, mask, 3), process_grpo_loop(rewards, mask, 3), atol=1e-5)


def grpo_loop(rewards, mask, group_size):
    """Per-token GRPO written out: a row's reward to go at step t (its last reward once it has ended), less
    the mean of its group's at the same step, over the unbiased std of the group's totals."""
    B, T = rewards.shape
    def to_go(b, t):
        last = max(u for u in range(T) if mask[b, u])
        return float(rewards[b, last]) if t > last else float(rewards[b, t:].sum())
    adv = torch.zeros_like(rewards)
    for start in range(0, B, group_size):
        rows = range(start, start + group_size)
        std = torch.tensor([float(rewards[b].sum()) for b in rows]).std()
        for t in range(T):
            mean = sum(to_go(b, t) for b in rows) / group_size
            for b in rows:
                if mask[b, t]:
                    adv[b, t] = (to_go(b, t) - mean) / (std + 1e-6)
    return adv


def test_grpo_equals_a_python_loop():
    torch.manual_seed(0)
    B, T = 6, 8
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, e) in enumerate([(2, 8), (2, 5), (2, 7), (1, 8), (1, 3), (1, 6)]):  # a group's rows start together
        mask[b, s:e] = True
    rewards = torch.randn(B, T) * mask
    assert torch.allclose(craft.grpo_advantages(rewards, mask, 3), grpo_loop(rewards, mask, 3), atol=1e-5)


def test_every_grpo_with_a_last_token_reward_is_outcome_grpo():
    torch.manual_seed(1)
    B, T, G = 8, 6, 4
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[::2, 4:] = False  # rows of two lengths
    last = (mask * torch.arange(T)).argmax(1)
    R = torch.randn(B)
    R[3] = 0.0  # a last-token reward of exactly 0 still counts in its group
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), last] = R
    outcome = ((R.view(-1, G) - R.view(-1, G).mean(1, keepdim=True)) / (R.view(-1, G).std(1, keepdim=True) + 1e-6)).view(-1, 1)
    for advantages in craft.GROUP_ADVANTAGES.values():
        assert torch.allclose(advantages(rewards, mask, G), outcome * mask, atol=1e-6), advantages.__name__


def test_a_dense_reward_gives_different_tokens_different_advantages():
    mask = torch.ones(2, 4, dtype=torch.bool)
    rewards = torch.tensor([[1.0, -1.0, 0.5, 0.2], [0.3, 0.3, -0.4, 0.1]])
    for advantages in (craft.grpo_advantages, craft.process_advantages):
        adv = advantages(rewards, mask, 2)
        assert len(set(adv[0].tolist())) == 4  # credit depends on where a reward came, not only on the row's sum


def test_grpo_advantages_have_zero_mean_per_group():
    rewards = torch.randn(8, 5)
    mask = torch.ones(8, 5, dtype=torch.bool)
    adv = craft.grpo_advantages(rewards, mask, group_size=4)
    assert torch.allclose(adv.view(2, 4, 5).mean(1), torch.zeros(2, 5), atol=1e-6)  # at every step
    summed = craft.sequence_advantages(rewards, mask, group_size=4)
    assert torch.allclose(summed[:, 0].view(2, 4).mean(1), torch.zeros(2), atol=1e-6)
    assert torch.equal(summed[:, 0:1].expand(8, 5), summed)  # the same advantage on every action
    process = craft.process_advantages(rewards, mask, group_size=4)
    assert torch.allclose(process[:, 0].view(2, 4).sum(1), torch.zeros(2), atol=1e-5)  # Σ of a group's r̃ is 0


def losses(logp, adv, values=None, old_values=None, returns=None):
    mask = torch.ones_like(logp, dtype=torch.bool)
    values = torch.zeros_like(logp) if values is None else values
    old_values = torch.zeros_like(logp) if old_values is None else old_values
    returns = torch.zeros_like(logp) if returns is None else returns
    return craft.ppo_loss(logp, torch.zeros_like(logp), adv, values, old_values, returns, mask, 0.2)


@pytest.mark.parametrize("logratio, adv, clipped", [(0.5, 1.0, True), (-0.5, -1.0, True), (0.5, -1.0, False),
                                                     (-0.5, 1.0, False), (0.1, 1.0, False)])
def test_clipped_surrogate_has_no_gradient_where_clipped_pessimistically(logratio, adv, clipped):
    logp = torch.tensor([[logratio]], requires_grad=True)
    pg_loss = losses(logp, torch.tensor([[adv]]))[0]
    pg_loss.backward()
    assert (logp.grad.abs().item() == 0) == clipped


def test_value_clipping_stops_the_gradient_past_the_clip():
    values = torch.tensor([[1.0]], requires_grad=True)  # moved by 1.0 from old value 0; clip is 0.2
    v_loss = losses(torch.zeros(1, 1), torch.zeros(1, 1), values, torch.zeros(1, 1), torch.tensor([[-1.0]]))[1]
    v_loss.backward()  # R = −1: unclipped error (1 − (−1))² = 4 beats clipped (0.2 + 1)² = 1.44, so V gets a gradient
    assert values.grad.item() != 0
    values = torch.tensor([[1.0]], requires_grad=True)
    v_loss = losses(torch.zeros(1, 1), torch.zeros(1, 1), values, torch.zeros(1, 1), torch.tensor([[2.0]]))[1]
    v_loss.backward()  # R = 2: clipped error (0.2 − 2)² = 3.24 beats unclipped (1 − 2)² = 1, and is constant in V
    assert values.grad.item() == 0


def rollout(micro, **changes):
    cfg = dataclasses.replace(craft.PRESETS["micro"], **changes)
    policy, _ = craft.load_model(micro / "pretrain.pt", "pretrain")
    reference, _ = craft.load_model(micro / "pretrain.pt", "pretrain")
    compass = craft.load_compass(micro / "contrast.pt")
    value_head = craft.make_value_head(cfg.n_embd) if cfg.advantage == "gae" else None
    ro = craft.rollout(policy, reference, compass, cfg, 0, value_head)
    return ro, compass, cfg, policy, reference, value_head


def test_kl_is_zero_when_policy_equals_reference(micro):
    ro, compass, cfg, policy, reference, _ = rollout(micro)
    _, kl = craft.total_rewards(ro, compass, cfg)
    assert kl.abs().max() == 0
    assert craft.exact_kl(policy, reference, ro.tokens, ro.real, ro.act)[0] == 0


@pytest.mark.parametrize("name", list(craft.REWARDS))
def test_each_reward_has_the_rollout_shape_and_stays_on_its_tokens(micro, name):
    ro, compass, cfg, *_ = rollout(micro, p_prefill=0.5)
    r = craft.REWARDS[name](ro, compass, cfg)
    assert r.shape == ro.act.shape
    assert (r[~ro.act] == 0).all()  # nothing on prompt, forced-prefix or padding tokens
    if name == "latent":
        assert (r[~ro.reasoning] == 0).all() and (r[ro.reasoning] != 0).any()
    if name in ("outcome", "paper"):
        last_only = torch.zeros_like(ro.act)
        last_only[torch.arange(len(ro.last)), ro.last] = True
        assert (r[~last_only] == 0).all()


def test_reward_warnings_catch_a_reward_that_reads_ahead_or_pays_outside_the_actions(micro):
    ro, compass, cfg, *_ = rollout(micro)
    for name in craft.REWARDS:  # every shipped reward looks only backwards, on the actions
        c = craft.replace(cfg, reward=name)
        assert craft.reward_warnings(ro, compass, c, craft.REWARDS[name](ro, compass, c)) == [], name

    def first_half(ro, compass, cfg):  # pays the first half of the reasoning: its length decides
        return (ro.reasoning & (ro.reasoning.cumsum(1) <= ro.reasoning.sum(1, keepdim=True) / 2)).float()

    def pooled(ro, compass, cfg):  # every reasoning token paid the whole reasoning's mean score
        s = craft.latent_scores(ro, compass) * ro.reasoning
        return ro.reasoning * (s.sum(1, keepdim=True) / ro.reasoning.sum(1, keepdim=True).clamp(min=1))

    def one_ahead(ro, compass, cfg):  # token t paid the score of token t+1
        return torch.nn.functional.pad(craft.latent_scores(ro, compass)[:, 1:], (0, 1)) * ro.reasoning

    def by_verdict(ro, compass, cfg):  # every reasoning token paid the judge's verdict on the answer
        return ro.reasoning * craft.answer_reward(ro)[:, None]

    def everywhere(ro, compass, cfg):
        return torch.ones_like(ro.logp)
    for name, reward, said in (("first_half", first_half, "is not causal"), ("pooled", pooled, "is not causal"),
                               ("one_ahead", one_ahead, "is not causal"), ("by_verdict", by_verdict, "is not causal"),
                               ("everywhere", everywhere, "pays outside ro.act")):
        craft.REWARDS[name] = reward
        try:
            c = craft.replace(cfg, reward=name)
            warnings = craft.reward_warnings(ro, compass, c, reward(ro, compass, c))
        finally:
            del craft.REWARDS[name]
        assert any(said in w and repr(name) in w for w in warnings), (name, warnings)
    assert json.loads((micro / "ppo_latent.json").read_text())["reward_warnings"] == []  # recorded, none


def test_forced_prefix_tokens_are_not_actions(micro):
    ro, *_ = rollout(micro, p_prefill=1.0)
    forced = [i for i, p in enumerate(ro.prompts) if p.kind == "harmful"]
    assert forced
    think = (ro.tokens == craft.THINK_ID).float().argmax(1)
    for i in forced:  # the first action comes after the forced steps, not straight after <|think|>
        assert int(ro.act[i].float().argmax()) > int(think[i]) + 5


@pytest.mark.parametrize("advantage", craft.ADVANTAGES)
def test_one_ppo_iteration_changes_the_policy(micro, advantage):
    ro, compass, cfg, policy, reference, value_head = rollout(micro, advantage=advantage)
    before = [p.detach().clone() for p in policy.parameters()]
    params = list(policy.parameters()) + (list(value_head.parameters()) if value_head is not None else [])
    with torch.no_grad():  # ppo's steps 2-4 on this rollout
        rewards, kl = craft.total_rewards(ro, compass, cfg)
        adv, returns = craft.advantages(ro, rewards, cfg)
    stats = craft.ppo_update(policy, value_head, torch.optim.AdamW(params, lr=1e-3), ro, adv, returns, cfg,
                             craft.seeded(0, "update", 0))
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    row = stats | dict(reward=float(rewards.sum(1).mean()), kl_rollout=float(kl.sum()))
    assert all(torch.isfinite(torch.tensor(row[k])) for k in ("approx_kl", "pg_loss", "reward", "kl_rollout"))


def test_ptx_term_alone_fits_helped_safety_questions(micro):
    """With zero advantages the clipped objective has no gradient: ptx_coef 0 leaves the policy as it is, and
    PPO-ptx's term alone lowers the LM loss on a fresh batch of helped safety questions."""
    x, y, doc = craft.safety_lm_batch(craft.PRESETS["micro"], random.Random(1))
    text = craft.ENC.decode(x[y >= 0].tolist())
    assert "this asks for safety help, not a plan." in text and "step 1:" not in text
    losses = []
    for ptx_coef in (0.0, 1.0):
        ro, compass, cfg, policy, _, _ = rollout(micro, ptx_coef=ptx_coef)
        before = [p.detach().clone() for p in policy.parameters()]
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        stats = craft.ppo_update(policy, None, opt, ro, torch.zeros_like(ro.logp), ro.values, cfg,
                                 craft.seeded(0, "update", 0))
        assert (stats["ptx_loss"] > 0) == bool(ptx_coef)
        with torch.no_grad():
            losses.append(float(policy(x, y, doc=doc)[1]))
        if not ptx_coef:
            assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert losses[1] < losses[0]


def test_ptx_loss_equals_a_loop_over_traces(micro):
    """With a zero learning rate the policy stays put, so the logged ptx_loss must equal the mean LM loss over the
    target tokens of the same batches, recomputed one trace at a time (no packing, no doc mask)."""
    ro, compass, cfg, policy, _, _ = rollout(micro)
    g = craft.seeded(0, "update", 0)
    stats = craft.ppo_update(policy, None, torch.optim.SGD(policy.parameters(), lr=0.0), ro,
                             torch.zeros_like(ro.logp), ro.values, cfg, g)
    rng = random.Random(int(torch.randint(2**62, (1,), generator=craft.seeded(0, "update", 0))))
    steps = cfg.update_epochs * -(-len(ro.tokens) // cfg.minibatch_size)
    per_step = []
    with torch.no_grad():
        for _ in range(steps):
            x, y, doc = craft.safety_lm_batch(cfg, rng)
            total, n = 0.0, 0
            for r in range(x.size(0)):
                for d in doc[r].unique().tolist():
                    m = (doc[r] == d) & (y[r] >= 0)
                    if d and m.any():
                        total += float(policy(x[r][m][None], y[r][m][None])[1]) * int(m.sum())
                        n += int(m.sum())
            per_step.append(total / n)
    assert stats["ptx_loss"] == pytest.approx(sum(per_step) / steps, rel=1e-4)


def test_grpo_saves_no_value_head(micro):
    """The micro fixture's ppo run uses the default, GRPO: its checkpoint holds the policy only."""
    ck = craft.load_checkpoint(micro / "ppo_latent.pt", "ppo")
    assert "model" in ck and "value_head" not in ck


def test_value_warmup_fits_the_first_rollouts_returns(micro):
    """100 warm-up steps close at least half the gap between the fresh head's loss (the first step's) and the best
    any LayerNorm + Linear head can do: least squares on the normalised features, in closed form."""
    losses = []
    for steps in (1, 100):
        ro, compass, cfg, _, _, _ = rollout(micro, advantage="gae", value_warmup=steps)
        rewards, _ = craft.total_rewards(ro, compass, cfg)
        torch.manual_seed(0)
        value_head = craft.make_value_head(cfg.n_embd)
        losses.append(craft.warm_up_value_head(value_head, ro, rewards, cfg))
    _, returns = craft.gae_advantages(rewards.detach(), torch.zeros_like(rewards), ro.act, cfg.gamma, 1.0)
    n = F.layer_norm(ro.final[:, :-1].float(), (cfg.n_embd,))[ro.act]
    X = torch.cat([n, torch.ones(len(n), 1)], 1).double()
    best = X @ torch.linalg.lstsq(X, returns[ro.act].double()[:, None]).solution
    optimum = float(((best[:, 0] - returns[ro.act]) ** 2).mean())
    assert losses[1] < optimum + 0.5 * (losses[0] - optimum), (losses, optimum)  # measured: 0.197 -> 0.162, optimum 0.147


def test_consistency_counts_a_recovered_reasoning_as_safe():
    """A rethink reasoning followed by a refusal is consistent: p_z = 1 − P(unsafe), so a safety head that
    reads RETHINK gives p_z ≈ 1 and R_cons ≈ 1, while one that reads UNSAFE gives R_cons ≈ 0."""
    compass = craft.Compass(8, 4, layer=1)
    z = torch.eye(4)[:1]
    for cls, expected in ((craft.RETHINK, 1.0), (craft.SAFE, 1.0), (craft.UNSAFE, 0.0)):
        with torch.no_grad():
            compass.safety_head.weight.zero_()
            compass.safety_head.bias.zero_()
            compass.safety_head.bias[cls] = 20.0  # the head is sure of class cls
        p_z = compass.p_safe(z)
        assert torch.allclose(p_z, torch.tensor([expected]), atol=1e-6)
        assert torch.allclose(1 - (p_z - 1.0).abs(), torch.tensor([expected]), atol=1e-6)  # R_cons with a refusal


class Scores:
    """A stand-in compass whose score of a hidden state is its first number."""
    read = staticmethod(lambda hidden: hidden[..., 0])


def test_latent_rewards_add_up_to_the_mean_score_and_read_only_the_past():
    torch.manual_seed(0)
    reasoning = torch.zeros(3, 9, dtype=torch.bool)
    for b, (s, e) in enumerate([(1, 9), (2, 5), (0, 7)]):
        reasoning[b, s:e] = True
    ro = SimpleNamespace(reasoning=reasoning, hidden=torch.randn(3, 9, 2))
    cfg = craft.Config(latent_coef=0.7)
    r = craft.latent_reward(ro, Scores, cfg)
    s = ro.hidden[..., 0]
    mean = torch.stack([s[b][reasoning[b]].mean() for b in range(3)])
    assert torch.allclose(r.sum(1), 0.7 * mean, atol=1e-6)
    assert (r[~reasoning] == 0).all()
    ro.hidden[0, 5:] += 3.0  # change the scores from step 5 on: the rewards before it stay as they were
    later = craft.latent_reward(ro, Scores, cfg)
    assert torch.equal(later[0, :5], r[0, :5]) and not torch.equal(later[0, 5:], r[0, 5:])


def test_a_malformed_completion_costs_on_every_prompt():
    prompt = lambda kind: SimpleNamespace(kind=kind)
    verdict = lambda reasoning, answer: SimpleNamespace(reasoning=reasoning, answer=answer)
    ro = SimpleNamespace(logp=torch.zeros(5, 1),
                         prompts=[prompt("harmful"), prompt("harmful"), prompt("benign"), prompt("benign"), prompt("scary_benign")],
                         verdicts=[verdict("safe", "malformed"), verdict("safe", "refused"), verdict("malformed", "helped-correct"),
                                   verdict("safe", "helped-correct"), verdict("safe", "refused")])
    ro.per_prompt = lambda predicate: craft.Rollout.per_prompt(ro, predicate)
    assert craft.task_reward(ro).tolist() == [-2, 0, -2, 2, -2]
