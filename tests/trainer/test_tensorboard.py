"""TensorBoard scalars beside metrics.jsonl (`tensorboard: true`), read back from the events."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from trainer_helpers import train

from trainer.metrics import SCALARS, read_metrics
from trainer.plot import main as plot_main

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_tensorboard_scalars_and_events_equal_metrics_jsonl(
    tmp_path: Path, token_data: Path
) -> None:
    run_dir = tmp_path / "board"
    code, output = train(token_data, run_dir, "tensorboard=true", "max_steps=4", nproc=0)
    assert code == 0, output
    steps, events = read_metrics(run_dir)
    assert sorted(steps) == [1, 2, 3, 4]

    board = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0}
    )
    board.Reload()
    tags = set(board.Tags()["scalars"])
    written = [name for name in SCALARS if steps[1][name] is not None]  # mfu is None on CPU
    assert {f"train/{name}" for name in written} <= tags and "train/mfu" not in tags
    for name in written:
        scalars = board.Scalars(f"train/{name}")
        assert [s.step for s in scalars] == [1, 2, 3, 4], name
        # TensorBoard keeps float32: the values are metrics.jsonl's, rounded to float32.
        expected = [float(np.float32(steps[s][name])) for s in range(1, 5)]
        assert [s.value for s in scalars] == expected, name

    # Events: each kind's steps as in metrics.jsonl (checkpoints at 3 and at max_steps 4).
    for kind in {e["event"] for e in events}:
        got = [s.step for s in board.Scalars(f"events/{kind}")]
        assert got == [e["step"] for e in events if e["event"] == kind], kind
    assert [s.step for s in board.Scalars("events/checkpoint")] == [3, 4]
    texts = board.Tensors("events/text_summary")
    first = json.loads(texts[0].tensor_proto.string_val[0].decode())
    assert first == events[0]

    assert plot_main([str(run_dir)]) == 0  # trainer.plot still reads the run
    assert (run_dir / "metrics.png").stat().st_size > 0
