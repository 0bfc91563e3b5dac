"""sweep: intervals over seeds, paired differences, and a killed sweep that reruns only what is missing."""
import json
import math

import craft
from conftest import run


def test_mean_interval_is_the_t_interval():
    m, (lo, hi) = craft.mean_interval([1.0, 2.0, 6.0])
    s = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    assert m == 3.0 and math.isclose(hi - m, 4.30 * s / math.sqrt(3)) and math.isclose(m - lo, hi - m)
    assert craft.mean_interval([0.5]) == (0.5, [0.5, 0.5])
    _, (lo12, hi12) = craft.mean_interval([float(i % 2) for i in range(13)])  # 12 degrees of freedom: t of 10
    assert math.isclose(hi12 - lo12, 2 * 2.23 * math.sqrt(sum((i % 2 - 6 / 13) ** 2 for i in range(13)) / 12) / math.sqrt(13))


def test_a_threshold_a_seed_never_reached_has_no_mean():
    never = craft.seed_summary([None, 3, None])
    assert never["mean"] is None and craft.interval_cell(never) == "never on 2/3 seeds"
    assert craft.interval_cell(craft.seed_summary([2, 4])) == "3.000 [-9.710, 15.710]"
    assert craft.interval_cell(None) == "—" and craft.interval_cell(craft.seed_summary([0.5])) == "0.500"


def test_asr_area_is_the_mean_asr_of_a_trapezoid_curve():
    assert craft.asr_area(dict(monitor_iteration=[0, 4, 8], monitor_asr=[1.0, 0.0, 0.0])) == 0.25


def test_a_killed_sweep_reruns_only_what_is_missing(micro, tmp_path, monkeypatch):
    seed_dir = tmp_path / "seed_0"
    seed_dir.mkdir()
    for name in ("pretrain.pt", "pretrain.json", "contrast.pt", "contrast.json", "ppo_latent.pt", "ppo_latent.json"):
        (seed_dir / name).write_bytes((micro / name).read_bytes())  # the sweep reuses them: same inputs
    args = ["sweep", "--preset=micro", "--rewards=latent,outcome", "--baselines=ipo_answer", "--seeds=0", f"--out={tmp_path}"]
    real_eval = craft.eval_cmd

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(craft, "eval_cmd", killed)
    assert run(*args) == 130
    done = {p.name: p.stat().st_mtime_ns for p in [*seed_dir.glob("ppo_*.json"), *seed_dir.glob("dpo_*.json")]}
    assert set(done) == {"ppo_latent.json", "ppo_outcome.json", "dpo_ipo_answer.json"}
    assert not (tmp_path / "sweep.json").exists()
    monkeypatch.setattr(craft, "eval_cmd", real_eval)
    assert run(*args) == 0
    again = {p.name: p.stat().st_mtime_ns for p in [*seed_dir.glob("ppo_*.json"), *seed_dir.glob("dpo_*.json")]}
    assert again == done  # not trained again
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert set(result["results"]) == {"base", "ppo_latent", "ppo_outcome", "dpo_ipo_answer"}
    assert set(result["paired_differences"]) == {"ppo_outcome", "dpo_ipo_answer"}
    diff = result["paired_differences"]["ppo_outcome"]["asr_heldout"]["mean"]
    per = result["results"]
    assert diff == per["ppo_outcome"]["asr_heldout"]["mean"] - per["ppo_latent"]["asr_heldout"]["mean"]
    md = (tmp_path / "sweep.md").read_text()
    assert all(f"| {row} |" in md for row in ("base", "ppo_outcome", "dpo_ipo_answer")) and "One seed gives no intervals" in md
    verdicts = json.loads((seed_dir / "eval_ppo_latent.json").read_text())["verdicts"]
    assert len(verdicts["heldout"]) == craft.PRESETS["micro"].eval_rows  # per prompt, for paired per-prompt tests
