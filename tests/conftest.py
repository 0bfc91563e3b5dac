"""Shared fixtures: one set of micro-preset artefacts (pretrain, contrast, ppo) for the whole session."""
import pytest
import torch

import craft

torch.set_num_threads(2)


def run(*argv):
    """craft.main in-process; returns the exit status (0 when it returns normally)."""
    try:
        craft.main(list(argv))
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """A directory with micro pretrain.pt, contrast.pt and ppo_latent.pt (ppo runs contrast first)."""
    out = tmp_path_factory.mktemp("micro")
    for stage in ("pretrain", "ppo"):
        assert run(stage, "--preset=micro", f"--out={out}") == 0
    assert (out / "contrast.pt").is_file() and (out / "contrast.json").is_file()
    return out


@pytest.fixture(scope="session")
def micro_demo(micro, tmp_path_factory):
    """`demo --full --rewards=latent,outcome` on the micro preset, reusing the session's pretrain, contrast and ppo."""
    out = tmp_path_factory.mktemp("demo")
    for name in ("pretrain.pt", "pretrain.json", "contrast.pt", "contrast.json", "ppo_latent.pt", "ppo_latent.json"):
        (out / name).write_bytes((micro / name).read_bytes())
    assert run("demo", "--preset=micro", f"--out={out}", "--rewards=latent,outcome", "--full") == 0
    return out
