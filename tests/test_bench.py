import json
import math

import craft
from conftest import run


def test_bench_writes_every_field_positive_and_finite(tmp_path, monkeypatch):
    timed = craft.median_seconds
    monkeypatch.setattr(craft, "median_seconds", lambda fn, *_: timed(fn, 1, 0))  # one timed run: fields, not speed
    monkeypatch.setattr(craft, "BENCH_PPO", dict(n_layer=2, n_head=2, n_embd=32, rollout_batch=8, max_new_tokens=8,
                                                 minibatch_size=4, update_epochs=1, block_size=96))
    assert run("bench", "--preset=micro", "--batch_size=4", "--block_size=80", "--max_new_tokens=16",
               "--eval_batch=32", f"--out={tmp_path}") == 0
    r = json.loads((tmp_path / "bench.json").read_text())
    for key in ("pretrain_tokens_per_s_packed", "pretrain_tokens_per_s_padded",
                "packing_speedup", "generate_tokens_per_s_cached", "generate_tokens_per_s_uncached",
                "kv_cache_speedup", "generate_tokens_per_s_monitored", "monitor_speed_ratio",
                "eval_generate_tokens_per_s", "gae_tokens_per_s", "grpo_tokens_per_s", "peak_memory_mb"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    for advantage in ("gae", "grpo"):
        assert set(r[f"{advantage}_iteration_seconds"]) == {"rollout", "reward", "advantage", "update"}
