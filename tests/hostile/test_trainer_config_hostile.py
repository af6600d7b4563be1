"""Trainer config errors: every key's type and range, the dataset and a resume, each refused
with one line naming the key (or the file) and, from the command line, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamshards import ShardWriter
from trainer.config import DEFAULTS, SCHEMA, ConfigError, leaves, load_config
from trainer.pretrain import build_loader

sys.path.insert(0, str(Path(__file__).parents[1] / "trainer"))

from trainer_helpers import SEQ_LEN, VOCAB, command, write_token_data  # noqa: E402

# Values of the wrong type for each kind of key, and one past each end of its range.
WRONG_TYPE = {
    "int": ["big", 1.5, True, [1]],
    "float": ["abc", True, ".nan", ".inf", {"a": 1}],
    "bool": ["sometimes", 1, None],
    "str": [5, "", ["a"]],
    "size": [0, -1, True, 1.5],
    "betas": [0.9, [0.9], [0.9, 1.0], [0.9, "x"], [0.9, 0.95, 0.99]],
    "step": [0, -3, "3@x", "x", 1.5, True],
}


def bad_values(key: str) -> list:
    rule = SCHEMA[key]
    values = [v for v in WRONG_TYPE[rule.kind] if not rule.accepts(v)]
    if rule.low is not None and rule.kind in ("int", "float"):
        values.append(rule.low if rule.above else rule.low - 1)
    if rule.high is not None:
        values.append(rule.high + 1)
    return values


CASES = [(key, value) for key in SCHEMA for value in bad_values(key)]


def yaml_text(value: object) -> str:
    """The override text of ``value`` (a string stays a plain YAML word)."""
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return str(value).replace("'", '"')


def test_the_schema_names_every_key_and_passes_every_default_and_bundled_config() -> None:
    assert set(SCHEMA) == set(leaves(DEFAULTS))
    assert all(len(bad_values(key)) >= 2 for key in SCHEMA)  # each key has a type and a range case
    for name in ("tiny", "gpt-125m", "gpt-350m", "gpt-1b", "gpt-3b", "gpt-7b"):
        load_config(name, ["data.local=/data"])


@pytest.mark.parametrize(("key", "value"), CASES, ids=[f"{k}={v!r}" for k, v in CASES])
def test_every_key_refuses_a_wrong_type_or_range_naming_the_key(key: str, value: object) -> None:
    override = f"{key}={yaml_text(value)}"
    with pytest.raises(ConfigError) as error:
        load_config("tiny", ["data.local=/data", override])
    message = str(error.value)
    assert "\n" not in message and key in message, message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.lr=abc"], "optim.lr must be a number > 0, got 'abc'"),
        (["optim.lr=-1"], "optim.lr must be a number > 0, got -1"),
        (["model.dim=big"], "model.dim must be a positive integer, got 'big'"),
        (["data.num_workers=-1"], "data.num_workers must be an integer >= 0, got -1"),
        (["model.n_heads=5"], "model.dim 128 must be a multiple of model.n_heads 5"),
        (["guard.min_history=30"], "guard.min_history 30 must be <= guard.window 20"),
        (["optim.min_lr=1"], "optim.min_lr 1 must be <= optim.lr 0.003"),
        (["optim.lr=[1"], "override 'optim.lr=[1': not valid YAML"),
        (["data.local=null"], "set data.local and/or data.remote"),
    ],
)
def test_named_cases_give_one_line_naming_key_and_value(overrides: list, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config("tiny", ["data.local=/data", *overrides])
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


def test_numbers_in_exponent_form_are_numbers() -> None:
    config = load_config("tiny", ["data.local=/data", "optim.lr=3e-4", "optim.eps=1E-8"])
    assert config["optim"]["lr"] == 3e-4 and config["optim"]["eps"] == 1e-8


def data_config(data: Path, *overrides: str) -> dict:
    return load_config("tiny", [f"data.local={data}", f"model.seq_len={SEQ_LEN}", *overrides])


@pytest.mark.parametrize(
    ("where", "overrides", "expected"),
    [
        ("missing", [], "no dataset index at"),
        ("empty", [], "no dataset index at"),
        ("tokens", ["model.vocab_size=100"], "model.vocab_size 100 is smaller than the vocab"),
        ("tokens", [f"model.vocab_size={VOCAB - 1}"], f"token ids up to {VOCAB - 1}"),
        ("tokens", ["data.column=text"], "no column 'text'"),
        ("tokens", ["model.seq_len=16"], "needs integer rows of 17 tokens"),
    ],
)
def test_dataset_checks_name_the_dataset(
    tmp_path: Path, token_data: Path, where: str, overrides: list, expected: str
) -> None:
    data = {"missing": tmp_path / "none", "empty": tmp_path, "tokens": token_data}[where]
    config = data_config(data, *overrides)
    with pytest.raises(ConfigError, match=expected) as error:
        build_loader(config, per_rank_batch=4)
    assert str(data) in str(error.value) and "\n" not in str(error.value)


def test_a_vocab_size_that_covers_the_tokenizer_is_kept(token_data: Path) -> None:
    config = data_config(token_data, f"model.vocab_size={VOCAB}")
    build_loader(config, per_rank_batch=4)
    assert config["model"]["vocab_size"] == VOCAB
    config = data_config(token_data)
    build_loader(config, per_rank_batch=4)
    assert config["model"]["vocab_size"] == 512  # auto: rounded up to 64


@pytest.fixture(scope="module")
def token_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_data(tmp_path_factory.mktemp("tokens") / "data")


def other_token_data(folder: Path, count: int = 400) -> Path:
    """As many rows as ``write_token_data`` with the same schema, but other tokens."""
    provenance = {"tokenizer": {"vocab_size": VOCAB}}
    columns = {"tokens": f"ndarray:uint16:{SEQ_LEN + 1}"}
    with ShardWriter(folder, columns, size_limit="8KB", provenance=provenance) as writer:
        for i in range(count):
            writer.write({"tokens": np.full(SEQ_LEN + 1, i % VOCAB)})
    return folder


def run_trainer(data: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """One plain trainer process (no torchrun), stdout and stderr kept apart."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = command(data, run_dir, *overrides, nproc=0)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def assert_one_line_exit_2(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("trainer: ") and expected in result.stderr, result.stderr


def test_a_bad_value_on_the_command_line_exits_2_with_one_line(
    tmp_path: Path, token_data: Path
) -> None:
    result = run_trainer(token_data, tmp_path / "run", "optim.lr=abc")
    assert_one_line_exit_2(result, "optim.lr must be a number > 0, got 'abc'")
    assert result.stdout == "" and not (tmp_path / "run").exists()


def test_a_too_small_vocab_size_exits_2_before_training(tmp_path: Path, token_data: Path) -> None:
    result = run_trainer(token_data, tmp_path / "run", "model.vocab_size=100")
    assert_one_line_exit_2(result, "model.vocab_size 100 is smaller than the vocab_size 500")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resuming_on_other_data_exits_2_naming_the_checkpoint(
    tmp_path: Path, token_data: Path
) -> None:
    run_dir = tmp_path / "run"
    first = run_trainer(token_data, run_dir, "max_steps=1", "save_interval=1")
    assert first.returncode == 0, first.stderr
    saved_config = (run_dir / "config.yaml").read_text()

    other = other_token_data(tmp_path / "other")
    result = run_trainer(other, run_dir, "max_steps=2")
    assert_one_line_exit_2(result, "saved for different data (fingerprint")
    assert str(run_dir / "checkpoints" / "step_00000001") in result.stderr
    assert (run_dir / "config.yaml").read_text() == saved_config  # the run is left as it was
