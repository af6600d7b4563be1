"""The trainer's pure parts: config, model, schedule, guard, microbatch sizes, metrics, plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from trainer.config import ConfigError, load_config
from trainer.faults import parse_injection
from trainer.guards import ROLLBACK, SKIP, STEP, SpikeGuard
from trainer.metrics import MetricsLog, read_metrics
from trainer.microbatch import fit_microbatch, smaller_microbatch
from trainer.model import ModelConfig, Transformer, count_params, flops_per_token
from trainer.plot import plot_run
from trainer.pretrain import lr_at

BUNDLED = ["tiny", "gpt-125m", "gpt-350m", "gpt-1b", "gpt-3b", "gpt-7b"]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_configs_load_by_name_with_the_common_recipe(name: str) -> None:
    config = load_config(name, ["data.local=/data"])
    optim = config["optim"]
    assert optim["grad_clip"] == 1.0 and optim["warmup_steps"] > 0
    if name != "tiny":
        assert config["model"]["seq_len"] == 2048 and optim["betas"] == [0.9, 0.95]


def test_overrides_are_typed_and_unknown_keys_name_the_key() -> None:
    config = load_config("tiny", ["data.local=/d", "model.dim=96", "microbatch_size=2"])
    assert config["model"]["dim"] == 96 and config["microbatch_size"] == 2
    with pytest.raises(ConfigError, match="model.dimm"):
        load_config("tiny", ["data.local=/d", "model.dimm=96"])
    with pytest.raises(ConfigError, match="microbatch_size must be a positive integer"):
        load_config("tiny", ["data.local=/d", "microbatch_size=0"])
    with pytest.raises(ConfigError, match="data.local"):
        load_config("tiny")
    with pytest.raises(ConfigError, match="neither a file nor a bundled name"):
        load_config("no-such-config")


def test_injection_spec_picks_step_and_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert parse_injection("5@1", rank=1) == 5 and parse_injection("5@1", rank=0) is None
    assert parse_injection(7, rank=3) == 7 and parse_injection(None, rank=0) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert parse_injection("5@1", rank=1) is None  # first attempt only


def tiny_model(tie: bool = False) -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        ModelConfig(vocab_size=97, seq_len=16, dim=32, n_layers=2, n_heads=4, tie_embeddings=tie)
    )


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_formula_matches_the_module(tie: bool) -> None:
    model = tiny_model(tie)
    total, matmul = count_params(model.cfg)
    assert total == sum(p.numel() for p in model.parameters())
    assert matmul == total - (0 if tie else model.embed.weight.numel())
    assert flops_per_token(model.cfg) == 6 * matmul + 12 * 2 * 32 * 16


def test_the_model_is_causal() -> None:
    model = tiny_model().eval()
    tokens = torch.randint(0, 97, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 16, 97)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.allclose(a[:, 10:], b[:, 10:])


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor() -> None:
    optim = {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "decay_steps": None}
    lrs = [lr_at(s, optim, 110) for s in range(1, 111)]
    assert lrs[4] == pytest.approx(0.5) and lrs[9] == pytest.approx(1.0)
    assert lrs[59] == pytest.approx(0.55) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_guard_skips_non_finite_steps_and_rolls_back_on_spikes_or_repeats() -> None:
    guard = SpikeGuard(window=10, min_history=3, z_threshold=4.0, max_nonfinite=2)
    for loss in (3.0, 2.9, 3.1):
        assert guard.judge(loss, 1.0) == (STEP, "")
    assert guard.judge(float("nan"), 1.0)[0] == SKIP
    assert guard.judge(3.0, 1.0)[0] == STEP  # a finite step resets the count
    assert guard.judge(2.95, float("inf"))[0] == SKIP
    assert guard.judge(float("nan"), 1.0)[0] == ROLLBACK  # two non-finite steps in a row
    action, reason = guard.judge(30.0, 1.0)
    assert action == ROLLBACK and "spike" in reason
    assert 30.0 not in guard.history  # a spike never enters the window it is judged against
    restored = SpikeGuard(window=10, min_history=3, z_threshold=4.0, max_nonfinite=2)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.judge(30.0, 1.0)[0] == ROLLBACK


@given(st.integers(1, 512), st.integers(1, 512))
def test_smaller_microbatch_divides_the_batch_and_at_least_halves(batch: int, size: int) -> None:
    size = min(size, batch)
    smaller = smaller_microbatch(batch, size)
    if size == 1:
        assert smaller is None
    else:
        assert smaller is not None and batch % smaller == 0 and smaller <= size // 2
    fitted = fit_microbatch(size, batch)
    assert batch % fitted == 0 and fitted <= size


def test_metrics_log_drops_a_torn_last_line_and_later_records_win(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, rank=0)
    log.step(step_record(1, 2.0))
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a process killed mid-write
    log = MetricsLog(tmp_path, rank=0)
    log.event("resume", 1, checkpoint="x")
    log.step(step_record(2, 1.5))
    log.close()
    steps, events = read_metrics(tmp_path)
    assert {s: r["loss"] for s, r in steps.items()} == {1: 2.0, 2: 1.5}
    assert [e["event"] for e in events] == ["resume"]


def step_record(step: int, loss: float) -> dict:
    return {
        "step": step,
        "loss": loss,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens_per_s": 1000.0,
        "mfu": None,
        "peak_mem_gb": 0.1,
        "data_wait_s": 0.0,
        "microbatch_size": 2,
    }


def test_plot_writes_a_png(tmp_path: Path) -> None:
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            record = {"step": step, "loss": 5 / step, "tokens_per_s": 100.0 + step, "mfu": 0.3}
            f.write(json.dumps(record) + "\n")
        f.write(json.dumps({"event": "rollback", "step": 3}) + "\n")
    out = plot_run(tmp_path)
    assert out == tmp_path / "metrics.png" and out.read_bytes()[:4] == b"\x89PNG"
