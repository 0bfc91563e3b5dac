import random
import re

import pytest

from data import world
from data.judge import PLAN_STEP, judge


class Mix:  # the cpu preset's shares
    p_plain, p_wrapped, p_scary, p_safety, p_benign_wrapped = 0.2, 0.3, 0.1, 0.05, 0.8
    plain_unsafe, plain_rethink, wrapped_unsafe, wrapped_rethink, unsafe_refuses = 0.05, 0.05, 0.8, 0.05, 0.25


def traces(n=2000, seed=0):
    rng = random.Random(seed)
    return [world.pretraining_trace(rng, Mix) for _ in range(n)]


def test_the_world_is_deterministic():
    assert [t.text() for t in traces(200)] == [t.text() for t in traces(200)]
    assert [t.text() for t in traces(200)] != [t.text() for t in traces(200, seed=1)]


def training_prompts():
    """Thousands of prompts from every training generator: pretraining, stage 1's train split, PPO's rollouts,
    DPO's pairs."""
    import craft
    cfg = craft.PRESETS["cpu"]
    rng = random.Random("pairs")
    prompts = [t.prompt for t in traces(4000)] + [t.prompt for t in craft.compass_traces(cfg, "train")]
    prompts += [world.preference_pair(rng, cfg, answer_only)[0].prompt for answer_only in (False, True) for _ in range(1000)]
    return prompts + [p for it in range(40) for p in craft.rollout_prompts(cfg, it)[0]]


def test_nothing_held_out_appears_in_any_training_draw():
    prompts = training_prompts()
    corpus = "\n".join(p.text for p in prompts)
    held_texts = [phrase for phrases in world.HELDOUT_WRAPPERS.values() for phrase in phrases]
    held_shapes = [part.strip() for shape in world.HELDOUT_SHAPES.values()
                   for part in re.split(r"\{\w+\}", shape) if len(part.strip()) > 3]
    held_look_alikes = [request for request, *_ in world.SCARY_HELDOUT]
    reworded = [f"{verb} [HAZARD" for verbs in world.REWORDED_VERBS.values() for verb in verbs]
    held_safety = [part.strip() for *_, asks in world.SAFETY.values() for ask in asks
                   for part in ask.split("{t}") if part.strip()]
    for text in held_texts + held_shapes + held_look_alikes + reworded + held_safety:
        assert text not in corpus, text
    assert {p.shape for p in prompts} == {""} | set(world.TRAIN_SHAPES)


def test_every_kind_is_wrapped_in_training():
    """A wrapper is no sign of harm: benign and scary-benign requests come wrapped as well, in every shape."""
    seen = {(p.kind, p.shape) for p in training_prompts() if p.wrapper}
    assert seen == {(k, s) for k in world.KINDS for s in world.TRAIN_SHAPES}


HARM_WORDS = {"step", "obtain", "combine", "with", "heat", "slowly", "hide", "from", "everyone", "prepare", "in",
              "secret", "deploy"}


def test_harmful_steps_are_placeholders_only():
    for t in traces():
        for text, label in t.steps:
            if label == "unsafe" and text.startswith("step "):
                words = re.sub(world.PLACEHOLDER, "", text.split(": ", 1)[1]).replace(".", "").split()
                assert set(words) <= HARM_WORDS, text
        if "here is the plan" in t.answer:
            assert re.fullmatch(rf"here is the plan: ([a-z ]|{world.PLACEHOLDER}|, then )+\.", t.answer)


def test_step_labels_agree_with_the_judge():
    for t in traces(600):
        completion = t.text().split(world.THINK, 1)[1]
        v = judge(completion, t.prompt.kind, t.prompt.answer)
        assert v.reasoning == t.reasoning
        labels = [lab for _, lab in t.steps]
        if t.reasoning == "rethink":  # unsafe first, then safe, switching exactly once at the "wait"
            switch = labels.index("safe")
            assert set(labels[:switch]) == {"unsafe"} and set(labels[switch:]) == {"safe"}
            assert t.steps[switch][0].startswith("wait")
        else:
            assert set(labels) == {t.reasoning}
        expected = "helped-correct" if t.prompt.kind != "harmful" else "complied" if "plan" in t.answer else "refused"
        assert v.answer == expected


def test_eval_sets_are_committed_and_match_the_generator():
    sets = world.load_eval_sets()
    assert {k: len(v) for k, v in sets.items()} == world.EVAL_SIZES
    fresh = world.make_eval_sets()
    assert all(vars(a) == vars(b) for name in sets for a, b in zip(sets[name], fresh[name]))
    for name in ("heldout", "benign_wrapped", "scary_wrapped", "obfuscated"):
        assert all(p.wrapper in world.HELDOUT_WRAPPERS for p in sets[name])
    assert all(f"{p.verb} {p.target}" in p.text and p.verb in sum(world.REWORDED_VERBS.values(), [])
               for p in sets["obfuscated"])
    assert all(p.shape in world.HELDOUT_SHAPES for p in sets["heldout_shape"])
    held = {help_text for *_, help_text in world.SCARY_HELDOUT}
    assert all(p.answer in held for p in sets["scary_heldout"] + sets["scary_wrapped"])
    asks = {name: {ask for *_, train, heldout in world.SAFETY.values() for ask in (train, heldout)[i]}
            for i, name in enumerate(("safety", "safety_heldout"))}
    for name in asks:
        assert all((p.request or p.text).replace(p.target, "{t}") in asks[name] for p in sets[name])
    assert not any(p.wrapper for p in sets["safety"])
    wrapped = [p.wrapper in world.HELDOUT_WRAPPERS for p in sets["safety_heldout"] if p.wrapper]
    assert all(wrapped) and 0.35 < len(wrapped) / len(sets["safety_heldout"]) < 0.65


def test_safety_questions_name_a_hazard_and_help_with_safety_only():
    """Every safety trace names its hazard by placeholder only, holds no plan step, and the judge reads
    safe reasoning and a correct answer; no ask uses a verb of the harmful requests, so the keyword
    filter lets them through, and a different verb is all that tells them from a harmful request."""
    safety = [t for t in traces(3000) if t.prompt.kind == "safety"]
    assert len(safety) > 100
    for t in safety:
        text = t.text()
        assert PLAN_STEP.search(text) is None and "step " not in text
        assert re.findall(r"\[HAZARD[^\]]*\]", text) == re.findall(world.PLACEHOLDER, text) != []
        v = judge(text.split(world.THINK, 1)[1], "safety", t.prompt.answer)
        assert (v.reasoning, v.answer) == ("safe", "helped-correct")
    import craft
    assert not any(craft.BLOCKED.search(p.text) for name in ("safety", "safety_heldout")
                   for p in world.load_eval_sets()[name])


def test_look_alikes_are_distinct_and_share_verbs_with_harmful_requests():
    """helpful_trace finds a look-alike by its help text, so help texts are unique; and the idioms use the
    harmful requests' own verbs, so a verb alone never tells harm from help."""
    look_alikes = world.SCARY + world.SCARY_HELDOUT
    for column in (0, 3):
        assert len({row[column] for row in look_alikes}) == len(look_alikes)
    harmful_verbs = {v for _, verbs in world.CATEGORIES.values() for v in verbs}
    assert harmful_verbs & set(world.IDIOMS) == {"attack", "build", "grow", "kill", "take down", "wire up"}


def test_wrapped_benign_prompts_are_judged_like_plain_ones():
    """The right reasoning and answer for a wrapped benign or scary-benign prompt is the same as unwrapped,
    and the judge says so, even when the wrapper has digits of its own ("r3ad th1s")."""
    rng = random.Random(0)
    sets = world.load_eval_sets()
    for p in sets["benign_wrapped"] + sets["scary_wrapped"]:
        t = world.helpful_trace(rng, p)
        plain = world.helpful_trace(rng, world.Prompt(p.request, p.kind, p.answer))
        assert t.steps == plain.steps and t.answer == plain.answer
        assert judge(t.text().split(world.THINK, 1)[1], p.kind, p.answer).answer == "helped-correct"


@pytest.mark.parametrize("text, message", [
    ("", "no prompts"),
    ("not json\n", ":1: not JSON"),
    ('{"prompt": "hi", "kind": "benign"}\n{"kind": "benign"}\n', ":2: needs a string 'prompt'"),
    ('{"prompt": "hi", "kind": "evil"}\n', ":1: unknown kind 'evil'"),
])
def test_read_prompts_names_the_bad_line(tmp_path, text, message):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        world.read_prompts(path)
