"""Run configuration: defaults, a YAML file, then ``dotted.key=value`` overrides, validated."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
CONFIG_DIR = Path(__file__).parent / "configs"

DEFAULTS: dict[str, Any] = {
    "run_dir": "runs/default",
    "seed": 0,
    "max_steps": 1000,
    "global_batch_size": 64,  # samples per optimizer step, over all ranks
    "microbatch_size": "auto",  # samples per forward/backward on one rank, or auto
    "save_interval": 500,  # steps between checkpoints (and one at the end)
    "keep_last": 3,
    "autoresume": True,
    "watchdog_timeout": 600.0,  # seconds one step may take; 0 disables the watchdog
    "deterministic": False,  # deterministic kernels (exact resume on CPU)
    "peak_flops": None,  # accelerator peak FLOP/s for MFU; None: from the device name
    "tensorboard": False,  # also write metrics to run_dir/tensorboard (the tensorboard extra)
    "doctor": True,  # the node doctor's fast checks on every rank before training
    "checkpoint": {
        "remote": None,  # s3://bucket/prefix or gs://...: checkpoints there, uploaded async
    },
    "model": {
        "vocab_size": "auto",  # auto: the tokenizer's, from the dataset's provenance
        "seq_len": 2048,
        "dim": 768,
        "n_layers": 12,
        "n_heads": 12,
        "ffn_dim": None,
        "tie_embeddings": False,
        "rope_theta": 10000.0,
        "norm_eps": 1e-5,
        "init_std": 0.02,
    },
    "optim": {
        "lr": 6e-4,
        "min_lr": 6e-5,
        "warmup_steps": 100,
        "decay_steps": None,  # None: max_steps
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "weight_decay": 0.1,
        "grad_clip": 1.0,
    },
    "data": {
        "local": None,
        "remote": None,
        "column": "tokens",
        "shuffle": True,
        "num_workers": 1,
        "cache_limit": None,
    },
    "fsdp": {
        "bf16": "auto",  # auto: bf16 compute with fp32 reduction on GPU, fp32 on CPU
        "activation_checkpointing": False,
        "compile": False,
    },
    "guard": {
        "window": 50,  # healthy losses kept for the spike z-score
        "min_history": 10,  # losses needed before spikes are judged
        "z_threshold": 6.0,
        "max_nonfinite": 3,  # consecutive non-finite steps that trigger a rollback
        "max_rollbacks": 3,  # rollbacks in one run before it gives up
    },
    # Fault injection for tests (trainer/faults.py): "STEP" (every rank) or "STEP@RANK".
    "inject": {
        "oom": None,
        "oom_backward": None,
        "oom_optimizer": None,
        "spike": None,
        "nan": None,
        "hang": None,
        "kill_in_upload": None,  # SIGKILL mid-upload of a remote checkpoint (checkpoint.remote)
        "slow_upload": None,  # a remote checkpoint's upload starts 2 s late
    },
}


class ConfigError(ValueError):
    pass


def config_path(name_or_path: str) -> Path:
    """A YAML file path, or the name of a bundled config (``tiny``, ``gpt-125m``, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a bundled name ({names})")


def load_config(name_or_path: str, overrides: list[str] = ()) -> dict[str, Any]:
    """DEFAULTS updated by the YAML file, then by ``dotted.key=value`` overrides (YAML values)."""
    path = config_path(name_or_path)
    from_file = _yaml_value(path.read_text(), str(path)) or {}
    if not isinstance(from_file, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    config = copy.deepcopy(DEFAULTS)
    _merge(config, from_file, str(path), "")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        _set(config, key, _yaml_value(raw, f"override {item!r}"), f"override {item!r}")
    validate(config)
    return config


def _yaml_value(text: str, origin: str) -> Any:
    """``text`` parsed as YAML; a syntax error becomes a one-line ConfigError."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or type(error).__name__
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{origin}: not valid YAML ({problem}{where})") from None


def _merge(config: dict, update: dict, origin: str, prefix: str) -> None:
    for key, value in update.items():
        _set(config, prefix + key, value, origin)


def _set(config: dict, dotted: str, value: Any, origin: str) -> None:
    *parents, last = dotted.split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"{origin}: unknown key {'.'.join(parents[: i + 1])!r}")
        node = node[part]
    if last not in node:
        raise ConfigError(f"{origin}: unknown key {dotted!r}")
    if isinstance(node[last], dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: {dotted!r} is a section; give a mapping")
        _merge(config, value, origin, dotted + ".")
    elif SCHEMA[dotted].kind == "float" and isinstance(value, str) and _EXPONENT.fullmatch(value):
        node[last] = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
    else:
        node[last] = value


@dataclass(frozen=True)
class Rule:
    """The values one config key accepts: a kind, a range, and literal words ("auto", None)."""

    kind: str  # int, float, bool, str, size (bytes or "10GB"), betas, step (STEP or STEP@RANK)
    low: float | None = None
    high: float | None = None
    above: bool = False  # the low bound itself is excluded
    words: tuple[Any, ...] = ()

    def accepts(self, value: Any) -> bool:
        if any(value is word or value == word for word in self.words):
            return True
        if self.kind in ("int", "float"):
            typed = _integer(value) if self.kind == "int" else _number(value)
            return typed and self._in_range(value)
        if self.kind == "size":
            return (_integer(value) and self._in_range(value)) or _text(value)
        if self.kind == "betas":
            return (
                isinstance(value, list)
                and len(value) == 2
                and all(_number(v) and 0 <= v < 1 for v in value)
            )
        if self.kind == "step":
            return (_integer(value) and value >= 1) or bool(
                isinstance(value, str) and re.fullmatch(r"[1-9]\d*(@\d+)?", value)
            )
        return isinstance(value, bool) if self.kind == "bool" else _text(value)

    def _in_range(self, value: float) -> bool:
        low_ok = self.low is None or value > self.low or (value == self.low and not self.above)
        return low_ok and (self.high is None or value <= self.high)

    def describe(self) -> str:
        """The rule in words, for the error message."""
        if self.kind in ("int", "float"):
            if self.kind == "int" and self.low == 1 and self.high is None:
                text = "a positive integer"
            else:
                text = "an integer" if self.kind == "int" else "a number"
                if self.high is not None:
                    text += f" from {self.low} to {self.high}"
                elif self.low is not None:
                    text += f" {'>' if self.above else '>='} {self.low:g}"
        else:
            text = {
                "bool": "true or false",
                "str": "a non-empty string",
                "size": "a byte count or a size such as 10GB",
                "betas": "two numbers in [0, 1), e.g. [0.9, 0.95]",
                "step": "STEP or STEP@RANK",
            }[self.kind]
        words = " or ".join("null" if w is None else str(w) for w in self.words)
        return f"{text} or {words}" if words else text


# Every leaf key of DEFAULTS and the values it accepts; a test checks the two stay in step.
SCHEMA: dict[str, Rule] = {
    "run_dir": Rule("str"),
    "seed": Rule("int", 0, 2**31 - 1),  # numpy seeds are 32-bit; seed + rank must fit
    "max_steps": Rule("int", 1),
    "global_batch_size": Rule("int", 1),
    "microbatch_size": Rule("int", 1, words=("auto",)),
    "save_interval": Rule("int", 1),
    "keep_last": Rule("int", 1),
    "autoresume": Rule("bool"),
    "watchdog_timeout": Rule("float", 0),
    "deterministic": Rule("bool"),
    "peak_flops": Rule("float", 0, above=True, words=(None,)),
    "tensorboard": Rule("bool"),
    "doctor": Rule("bool"),
    "checkpoint.remote": Rule("str", words=(None,)),
    "model.vocab_size": Rule("int", 1, words=("auto",)),
    "model.seq_len": Rule("int", 1),
    "model.dim": Rule("int", 1),
    "model.n_layers": Rule("int", 1),
    "model.n_heads": Rule("int", 1),
    "model.ffn_dim": Rule("int", 1, words=(None,)),
    "model.tie_embeddings": Rule("bool"),
    "model.rope_theta": Rule("float", 0, above=True),
    "model.norm_eps": Rule("float", 0, above=True),
    "model.init_std": Rule("float", 0, above=True),
    "optim.lr": Rule("float", 0, above=True),
    "optim.min_lr": Rule("float", 0),
    "optim.warmup_steps": Rule("int", 0),
    "optim.decay_steps": Rule("int", 1, words=(None,)),
    "optim.betas": Rule("betas"),
    "optim.eps": Rule("float", 0, above=True),
    "optim.weight_decay": Rule("float", 0),
    "optim.grad_clip": Rule("float", 0, above=True),
    "data.local": Rule("str", words=(None,)),
    "data.remote": Rule("str", words=(None,)),
    "data.column": Rule("str"),
    "data.shuffle": Rule("bool"),
    "data.num_workers": Rule("int", 0),
    "data.cache_limit": Rule("size", 1, words=(None,)),
    "fsdp.bf16": Rule("bool", words=("auto",)),
    "fsdp.activation_checkpointing": Rule("bool"),
    "fsdp.compile": Rule("bool"),
    "guard.window": Rule("int", 2),
    "guard.min_history": Rule("int", 2),
    "guard.z_threshold": Rule("float", 0, above=True),
    "guard.max_nonfinite": Rule("int", 1),
    "guard.max_rollbacks": Rule("int", 0),
    **{f"inject.{kind}": Rule("step", words=(None,)) for kind in DEFAULTS["inject"]},
}

# Rules between keys, checked once every key passed its own: (holds, message.format(**config)).
RELATIONS: list[tuple[Callable[[dict[str, Any]], bool], str]] = [
    (
        lambda c: c["data"]["local"] is not None or c["data"]["remote"] is not None,
        "set data.local and/or data.remote (e.g. data.local=shards/)",
    ),
    (
        lambda c: (
            c["checkpoint"]["remote"] is None
            or re.match(r"(s3|gs)://[^/]|file://", c["checkpoint"]["remote"]) is not None
        ),
        "checkpoint.remote must be an s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or file:// URL, "
        "got {checkpoint[remote]!r}",
    ),
    (
        lambda c: c["model"]["dim"] % c["model"]["n_heads"] == 0,
        "model.dim {model[dim]} must be a multiple of model.n_heads {model[n_heads]}",
    ),
    (
        lambda c: c["model"]["dim"] // c["model"]["n_heads"] % 2 == 0,
        "model.dim / model.n_heads (the head dim, {model[dim]} / {model[n_heads]}) must be even "
        "for RoPE",
    ),
    (
        lambda c: c["optim"]["min_lr"] <= c["optim"]["lr"],
        "optim.min_lr {optim[min_lr]} must be <= optim.lr {optim[lr]}",
    ),
    (
        lambda c: c["guard"]["min_history"] <= c["guard"]["window"],
        "guard.min_history {guard[min_history]} must be <= guard.window {guard[window]}",
    ),
]


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def leaves(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model.dim": 768, ...}``: every leaf value of a nested config by its dotted key."""
    found: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            found.update(leaves(value, f"{prefix}{key}."))
        else:
            found[prefix + key] = value
    return found


def validate(config: dict[str, Any]) -> None:
    """Reject, naming the key, any value outside its ``SCHEMA`` rule or a broken relation."""
    for key, rule in SCHEMA.items():
        value = config
        for part in key.split("."):
            value = value[part]
        if not rule.accepts(value):
            raise ConfigError(f"{key} must be {rule.describe()}, got {value!r}")
    for holds, message in RELATIONS:
        if not holds(config):
            raise ConfigError(message.format(**config))


def dump(config: dict[str, Any]) -> str:
    """The effective config as YAML, in the order of DEFAULTS."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
