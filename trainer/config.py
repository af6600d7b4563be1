"""Run configuration: defaults, a YAML file, then ``dotted.key=value`` overrides, validated."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

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
    "inject": {"oom": None, "oom_backward": None, "spike": None, "nan": None, "hang": None},
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
    with open(path) as f:
        from_file = yaml.safe_load(f) or {}
    if not isinstance(from_file, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    config = copy.deepcopy(DEFAULTS)
    _merge(config, from_file, str(path), "")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        _set(config, key, yaml.safe_load(raw), f"override {item!r}")
    validate(config)
    return config


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
    else:
        node[last] = value


def validate(config: dict[str, Any]) -> None:
    """Reject values the trainer cannot run with, naming the key."""

    def positive_int(key: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")

    for key in ("max_steps", "global_batch_size", "save_interval", "keep_last"):
        positive_int(key, config[key])
    if config["microbatch_size"] != "auto":
        positive_int("microbatch_size", config["microbatch_size"])
    if config["model"]["vocab_size"] != "auto":
        positive_int("model.vocab_size", config["model"]["vocab_size"])
    timeout = config["watchdog_timeout"]
    if not isinstance(timeout, (int, float)) or timeout < 0:
        raise ConfigError(f"watchdog_timeout must be >= 0 seconds, got {timeout!r}")
    if config["data"]["local"] is None and config["data"]["remote"] is None:
        raise ConfigError("set data.local and/or data.remote (e.g. data.local=shards/)")
    if config["fsdp"]["bf16"] not in ("auto", True, False):
        raise ConfigError(f"fsdp.bf16 must be auto, true or false, got {config['fsdp']['bf16']!r}")


def dump(config: dict[str, Any]) -> str:
    """The effective config as YAML, in the order of DEFAULTS."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
