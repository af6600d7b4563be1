"""Hostile loader states: every malformed field is refused by name, nothing is coerced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamshards import ShardWriter, StreamingDataLoader, StreamingDataset

SAMPLES = 100
OPTIONS = dict(shuffle=True, seed=3, batch_size=4, num_partitions=4, shuffle_window=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("state") / "d"
    with ShardWriter(folder, {"id": "int64"}, compression=None, size_limit="300B") as writer:
        for i in range(SAMPLES):
            writer.write({"id": i})
    return folder


@pytest.fixture(scope="module")
def good(data: Path) -> dict[str, Any]:
    """A valid mid-epoch state: 40 samples into epoch 2."""
    return StreamingDataset(local=data, **OPTIONS).state_dict(40, epoch=2)


def _without(key: str):
    return lambda s: {k: v for k, v in s.items() if k != key}


def _with(key: str, value: Any):
    return lambda s: {**s, key: value}


def _order_with(key: str, value: Any):
    return lambda s: {**s, "order": {**s["order"], key: value}}


# (case id, how the good state is broken, what the error must name)
CASES = [
    *[
        (f"missing-{k}", _without(k), f"missing key.*{k}")
        for k in ("version", "epoch", "samples_seen", "fingerprint", "order")
    ],
    ("extra-key", _with("step", 10), "unknown key.*'step'"),
    ("version-bool", _with("version", True), "version True"),
    ("version-str", _with("version", "1"), "version '1'"),
    ("epoch-str", _with("epoch", "12"), "epoch must be an integer, got '12'"),
    ("epoch-float", _with("epoch", 8.9), "epoch must be an integer, got 8.9"),
    ("epoch-whole-float", _with("epoch", 2.0), "epoch must be an integer, got 2.0"),
    ("epoch-bool", _with("epoch", True), "epoch must be an integer, got True"),
    ("epoch-none", _with("epoch", None), "epoch must be an integer, got None"),
    ("epoch-negative", _with("epoch", -1), "epoch must not be negative"),
    ("seen-str", _with("samples_seen", "12"), "samples_seen must be an integer, got '12'"),
    ("seen-float", _with("samples_seen", 8.9), "samples_seen must be an integer, got 8.9"),
    ("seen-bool", _with("samples_seen", False), "samples_seen must be an integer, got False"),
    ("seen-list", _with("samples_seen", [40]), "samples_seen must be an integer"),
    ("seen-negative", _with("samples_seen", -4), "samples_seen must not be negative"),
    ("seen-past-end", _with("samples_seen", SAMPLES + 4), "samples_seen 104 is past the end"),
    ("seen-huge", _with("samples_seen", 2**70), "samples_seen .* is past the end"),
    ("order-list", _with("order", []), "order must be a dict, got list"),
    ("order-str", _with("order", "seed=3"), "order must be a dict, got str"),
    ("order-none", _with("order", None), "order must be a dict, got NoneType"),
    ("order-bool-shuffle", _order_with("shuffle", 1), "shuffle: saved 1, now True"),
    ("order-str-seed", _order_with("seed", "3"), "seed: saved '3', now 3"),
    ("order-extra", _order_with("world", 8), "world: saved 8, now 'nothing'"),
    ("order-missing", lambda s: {**s, "order": {}}, "seed: saved 'nothing', now 3"),
    ("fingerprint-other", _with("fingerprint", 0), "different data"),
]


@pytest.mark.parametrize("holder", ["dataset", "loader"])
@pytest.mark.parametrize(("case", "mutate", "message"), CASES, ids=[c[0] for c in CASES])
def test_hostile_state_is_refused_by_field(
    data: Path, good: dict[str, Any], holder: str, case: str, mutate, message: str
) -> None:
    """Each broken state raises a ValueError naming the field; the position does not move."""
    dataset = StreamingDataset(local=data, **OPTIONS)
    target = dataset if holder == "dataset" else StreamingDataLoader(dataset)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(mutate(dict(good)))
    assert (target.epoch, target.samples_seen) == (0, 0)


@pytest.mark.parametrize("state", [None, [], "state", 40], ids=lambda s: type(s).__name__)
def test_a_state_that_is_not_a_dict_is_refused(data: Path, state: Any) -> None:
    loader = StreamingDataLoader(StreamingDataset(local=data, **OPTIONS))
    with pytest.raises(ValueError, match="loader state must be a dict"):
        loader.load_state_dict(state)


def test_the_good_state_and_the_epoch_end_are_accepted(data: Path, good: dict[str, Any]) -> None:
    """The checks refuse only what is wrong: a state at exactly the epoch's end is valid."""
    loader = StreamingDataLoader(StreamingDataset(local=data, **OPTIONS))
    loader.load_state_dict(good)
    assert (loader.epoch, loader.samples_seen) == (2, 40)
    assert len(loader) == (SAMPLES - 40) // OPTIONS["batch_size"]
    loader.load_state_dict({**good, "samples_seen": SAMPLES})
    assert len(loader) == 0 and list(loader) == []
    assert loader.state_dict()["epoch"] == 3 and loader.state_dict()["samples_seen"] == 0
