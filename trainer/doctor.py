"""The node doctor: check on every rank what would fail hours into a run; one table on rank 0.

    torchrun --nproc_per_node=N -m trainer.doctor CONFIG.yaml [dotted.key=value ...]

The same config, overrides and launch command as ``trainer.pretrain``. Each rank checks its
dataset, its checkpoint folder and GPU memory alone, then all ranks meet for an all-reduce
and a clock reading. Results travel through the launch's TCP store, not the process group,
so a rank that hangs in a collective is named instead of hanging the doctor. Exit 0 when
every check passes, 2 when the config's paths or model fail on every rank alike, else
EXIT_CODE naming the rank(s) and the check. See docs/TRAINER.md.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import socket
import stat
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from streamshards.util import human_size
from trainer.config import ConfigError, load_config
from trainer.fsdp import init_distributed
from trainer.model import ModelConfig, count_params
from trainer.watchdog import Watchdog

EXIT_CODE = 77  # a check failed on some rank: fix or replace that node before restarting
CONFIG_ERROR = 2  # as the trainer's config errors: the same launch fails on any nodes
CHECKS = ("dataset", "checkpoint", "all-reduce", "gpu-memory", "clock", "versions")
LOCAL = ("dataset", "checkpoint", "gpu-memory")  # checked by each rank alone; when one fails
# on every rank, the config (a path, the model's size) is what is wrong, not a node
CLOCK_TOLERANCE_S = 1.0  # S3 rejects requests past 15 min of skew; logs need far better
NO_TIMEOUT_LIMIT_S = 600.0  # the collective limit when watchdog_timeout is 0 (off)
# Bytes per parameter: a checkpoint holds fp32 weights and AdamW's two fp32 moments; training
# also holds fp32 gradients (activations come on top and are not estimated).
CHECKPOINT_BYTES_PER_PARAM = 12
TRAINING_BYTES_PER_PARAM = 16
LIBRARIES = ("torch", "streamshards", "numpy", "zstandard", "tokenizers")
# Test-only fault: "hang_allreduce@RANK" makes that rank never start the all-reduce (first
# launch attempt only, as trainer/faults.py's).
INJECT_ENV = "TRAINER_DOCTOR_INJECT"
OK, FAIL, SKIP, WAIT = "ok", "FAIL", "skip", "wait"  # WAIT: stuck waiting for a blamed rank


@dataclass
class Result:
    """One check on one rank: a status (ok, FAIL, skip, wait) and a short detail."""

    status: str
    detail: str


def examine(config: dict[str, Any], device: torch.device, full: bool = True) -> int:
    """Run every check on this rank, print the table on rank 0; returns the exit code, the
    same on every rank: 0, CONFIG_ERROR or EXIT_CODE.

    ``full=False`` is the trainer's start-up subset: a 1 MiB all-reduce timed once.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    limit = config["watchdog_timeout"] or NO_TIMEOUT_LIMIT_S
    phase = ["start"]
    # The last resort for a rank stuck where no deadline reaches (a hung dataset read); past
    # the longest the deadlines below can add up to (barrier, all-reduce, verdict: 5 limits).
    watchdog = Watchdog(
        6 * limit,
        Path(config["run_dir"]) / f"watchdog-rank{rank}.log",
        describe=lambda: f"on rank {rank} in the node doctor ({phase[0]})",
    )
    watchdog.beat()
    store = _shared_store(device, limit)

    phase[0] = "local checks"
    dataset, params = check_dataset(config)
    local = {
        "host": socket.gethostname(),
        "dataset": dataset,
        "checkpoint": check_checkpoint_folder(config, params),
        "gpu-memory": check_gpu_memory(device, params, world_size),
        "versions": library_versions(),
    }
    store.set(f"local/{rank}", _encode(local))

    phase[0] = "the all-reduce"
    store.set(f"arrived/{rank}", "1")
    if _finished(dist.barrier(async_op=True), limit):
        store.set(f"clock/{rank}", repr(time.time()))
        all_reduce = check_all_reduce(device, store, limit, full)
    else:
        missing = _ranks(_missing(store, "arrived", world_size))
        all_reduce = Result(WAIT, f"{missing} did not arrive within {limit:g} s")
    store.set(f"all-reduce/{rank}", json.dumps(asdict(all_reduce)))

    phase[0] = "the report"
    if rank == 0:
        code = report(store, world_size, limit)
        store.set("verdict", str(code))
    else:
        code = _verdict(store, 3 * limit)
    watchdog.stop()
    return code


def examine_or_exit(config: dict[str, Any], device: torch.device) -> None:
    """The trainer's start-up check: on any failure every rank exits with the doctor's code
    (the process group may hold a hung collective, so there is no clean shutdown)."""
    code = examine(config, device, full=False)
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def check_dataset(config: dict[str, Any]) -> tuple[Result, int | None]:
    """Open the dataset and decode sample 0; also the model's parameter count, which needs
    the vocabulary (``model.vocab_size: auto`` is the tokenizer's, from the index)."""
    from streamshards import StreamingDataset

    data, column = config["data"], config["data"]["column"]
    where = " ".join(f"data.{k}={data[k]}" for k in ("local", "remote") if data[k])
    vocab = config["model"]["vocab_size"]
    try:
        dataset = StreamingDataset(
            local=data["local"],
            remote=data["remote"],
            shuffle=False,
            batch_size=1,
            cache_limit=data["cache_limit"],
        )
        sample = dataset[0]
    except Exception as error:  # whatever stops the data is the finding
        return Result(FAIL, f"{where}: {' '.join(str(error).split())}"), _params(config, vocab)
    if vocab == "auto":
        recorded = [
            p["tokenizer"].get("vocab_size")
            for p in dataset.provenance
            if isinstance(p.get("tokenizer"), dict)
        ]
        vocab = max((v for v in recorded if isinstance(v, int) and v > 0), default="auto")
    if column not in sample:
        found = ", ".join(sample)
        return Result(FAIL, f"{where}: no column {column!r} (columns: {found})"), None
    value = sample[column]
    shape = f" {getattr(value, 'dtype', '')} {tuple(getattr(value, 'shape', ()))}"
    detail = f"{len(dataset):,} samples; sample 0 decodes ({column}:{shape})"
    return Result(OK, detail), _params(config, vocab)


def _params(config: dict[str, Any], vocab: int | str) -> int | None:
    """Parameters of the configured model; None while the vocabulary is unknown."""
    if vocab == "auto":
        return None
    model = {**config["model"], "vocab_size": 64 * -(-vocab // 64)}
    return count_params(ModelConfig(**model))[0]


def check_checkpoint_folder(config: dict[str, Any], params: int | None) -> Result:
    """``run_dir/checkpoints`` (and ``checkpoint.remote`` if set) takes a file from this rank,
    and the folder has room for ``keep_last`` + 1 checkpoints (the kept ones and the one
    being written), counting those already there."""
    folder = Path(config["run_dir"]) / "checkpoints"
    probe = f".doctor-{socket.gethostname()}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / probe).write_bytes(b"doctor")
        (folder / probe).unlink()
    except OSError as error:
        return Result(FAIL, f"cannot write {folder}: {error.strerror or error}")
    remote = config["checkpoint"]["remote"]
    if remote is not None:
        from streamshards.storage import StorageError, open_storage

        try:
            storage = open_storage(remote)
            storage.put_bytes(b"doctor", probe)
            storage.delete(probe)
        except (StorageError, OSError, ValueError) as error:
            return Result(FAIL, f"cannot write {remote}: {' '.join(str(error).split())}")
    where = folder if remote is None else f"{remote} and {folder}"
    free = shutil.disk_usage(folder).free
    if params is None:
        return Result(OK, f"{where} writable, {_size(free)} free (model size unknown)")
    one = CHECKPOINT_BYTES_PER_PARAM * params
    held = _folder_bytes(folder)
    need = max((config["keep_last"] + 1) * one - held, 0)
    detail = f"{_size(free)} free, {config['keep_last'] + 1} x {_size(one)} needs {_size(need)}"
    return Result(OK if free >= need else FAIL, f"{where} writable; {detail}")


def _folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``; a file that goes while it is counted (another
    rank's probe, a checkpoint being replaced) counts as gone."""
    held = 0
    for root, _, files in os.walk(folder):  # os.walk skips folders that go meanwhile
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                held += info.st_size
    return held


def check_gpu_memory(device: torch.device, params: int | None, world_size: int) -> Result:
    """Free GPU memory against this rank's share of weights, gradients and AdamW moments
    (fp32, sharded by FSDP over all ranks; activations not counted)."""
    if device.type != "cuda":
        return Result(SKIP, "no GPU")
    free, total = torch.cuda.mem_get_info(device)
    if params is None:
        return Result(OK, f"{_size(free)} free of {_size(total)} (model size unknown)")
    need = TRAINING_BYTES_PER_PARAM * params // world_size
    detail = f"{_size(free)} free of {_size(total)}; needs {_size(need)} + activations"
    return Result(OK if free >= need else FAIL, detail)


def library_versions() -> dict[str, str]:
    """Python's and each library's version on this rank (libraries not installed: absent)."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def check_all_reduce(device: torch.device, store: dist.Store, limit: float, full: bool) -> Result:
    """Sum (rank + 1) over all ranks: every element must equal n(n+1)/2 within ``limit``
    seconds; the bus bandwidth is bytes x 2(n-1)/n / time, as nccl-tests reports it."""
    rank, n = dist.get_rank(), dist.get_world_size()
    size = (64 if device.type == "cuda" else 8) * 2**20 if full else 2**20
    repeats = 5 if full else 1
    if _injected("hang_allreduce", rank):
        time.sleep(10**6)
    store.set(f"started/{rank}", "1")
    buffer = torch.empty(size // 4, dtype=torch.float32, device=device)
    deadline = time.monotonic() + limit
    times = []
    for _ in range(repeats + 1):  # the first also connects and warms up
        buffer.fill_(rank + 1)
        started = time.perf_counter()
        try:
            done = _finished(dist.all_reduce(buffer, async_op=True), deadline - time.monotonic())
        except Exception as error:  # a peer that died closes the connection
            return Result(FAIL, f"all-reduce failed: {' '.join(str(error).split())[:160]}")
        if not done:
            missing = _missing(store, "started", n)
            waited = f"no result within {limit:g} s"
            if missing:
                return Result(WAIT, f"{waited}; {_ranks(missing)} never started it")
            return Result(FAIL, f"{waited}; every rank started it (network?)")
        times.append(time.perf_counter() - started)
        if not bool((buffer == n * (n + 1) / 2).all()):
            wrong = buffer[buffer != n * (n + 1) / 2][0].item()
            return Result(FAIL, f"wrong sum: {wrong:g}, expected {n * (n + 1) // 2}")
    seconds = min(times[1:]) if len(times) > 1 else times[0]
    bus = size * 2 * (n - 1) / n / seconds if n > 1 else 0.0
    speed = f"bus bandwidth {_size(bus)}/s" if n > 1 else "one rank: no bandwidth"
    return Result(OK, f"{_size(size)} sum correct in {seconds * 1e3:.1f} ms; {speed}")


def report(store: dist.Store, world_size: int, limit: float) -> int:
    """Gather every rank's results (waiting up to ``limit`` s), judge clocks and versions
    against rank 0, print the table; returns the exit code."""
    local = _gather(store, "local", world_size, limit)
    all_reduce = _gather(store, "all-reduce", world_size, limit)
    clocks = _gather(store, "clock", world_size, 0)
    absent = Result(FAIL, f"no report within {limit:g} s (stuck or dead)")
    table: dict[int, dict[str, Result]] = {}
    for rank in range(world_size):
        checks = local.get(rank, {})
        row = {name: Result(**checks[name]) if name in checks else absent for name in LOCAL}
        row["all-reduce"] = Result(**all_reduce[rank]) if rank in all_reduce else absent
        table[rank] = row
    _judge_clocks(table, clocks)
    _judge_versions(table, local)
    failures, everywhere = [], True
    for name in CHECKS:
        bad = [r for r in range(world_size) if table[r][name].status == FAIL]
        if bad:
            failures.append(f"{name} on {_ranks(bad)}")
            everywhere &= name in LOCAL and len(bad) == world_size
    code = EXIT_CODE if failures else 0
    if failures and everywhere:
        failures.append(f"on every rank alike: a config error (exit {CONFIG_ERROR})")
        code = CONFIG_ERROR
    print(_format(table, {r: local.get(r, {}).get("host", "?") for r in table}, failures))
    sys.stdout.flush()
    return code


def _judge_clocks(table: dict[int, dict[str, Result]], clocks: dict[int, float]) -> None:
    """Each rank's clock, read right after a barrier, against rank 0's."""
    for rank, row in table.items():
        if rank not in clocks or 0 not in clocks:
            row["clock"] = Result(WAIT, "no reading: the ranks did not meet")
            continue
        offset = clocks[rank] - clocks[0]
        within = abs(offset) <= CLOCK_TOLERANCE_S
        detail = f"{offset:+.3f} s from rank 0 (tolerance {CLOCK_TOLERANCE_S:g} s)"
        row["clock"] = Result(OK if within else FAIL, detail)


def _judge_versions(table: dict[int, dict[str, Result]], local: dict[int, Any]) -> None:
    """Each rank's library versions against rank 0's."""
    reference = local.get(0, {}).get("versions", {})
    for rank, row in table.items():
        versions = local.get(rank, {}).get("versions")
        if versions is None:
            row["versions"] = Result(FAIL, "no report")
            continue
        differ = [
            f"{name} {versions.get(name, 'absent')} (rank 0: {reference.get(name, 'absent')})"
            for name in sorted(set(versions) | set(reference))
            if versions.get(name) != reference.get(name)
        ]
        if differ:
            row["versions"] = Result(FAIL, "; ".join(differ))
        else:
            listed = ", ".join(f"{k} {v}" for k, v in versions.items())
            row["versions"] = Result(OK, listed if rank == 0 else "same as rank 0")


def _format(table: dict[int, dict[str, Result]], hosts: dict[int, str], failures: list[str]) -> str:
    """A status grid (rank x check), then rank 0's detail and every other rank's that is not
    ok, then the verdict."""
    width = max(len(h) for h in [*hosts.values(), "host"])
    header = f"{'rank':>4}  {'host':<{width}}  " + "  ".join(f"{c:<10}" for c in CHECKS)
    lines = [header.rstrip()]
    for rank, row in table.items():
        cells = "  ".join(f"{row[c].status:<10}" for c in CHECKS)
        lines.append(f"{rank:>4}  {hosts[rank]:<{width}}  {cells}".rstrip())
    lines.append("")
    for name in CHECKS:
        for rank, row in table.items():
            if rank == 0 or row[name].status not in (OK, SKIP):
                label = name if rank == 0 or row[name].status == FAIL else ""
                lines.append(f"{label:<11} rank {rank}: {row[name].status} {row[name].detail}")
    verdict = "FAIL: " + "; ".join(failures) if failures else "all checks passed"
    lines.append(f"doctor: {verdict} ({len(table)} rank(s))")
    return "\n".join(lines)


def _shared_store(device: torch.device, limit: float) -> dist.Store:
    """The launch's TCP store (torchrun's, or rank 0's from init_process_group), under a
    prefix rank 0 draws and broadcasts, so no run reads another's keys."""
    nonce = torch.tensor([secrets.randbits(62) if dist.get_rank() == 0 else 0], device=device)
    if not _finished(dist.broadcast(nonce, 0, async_op=True), limit):
        raise RuntimeError(f"node doctor: the process group did not answer in {limit:g} s")
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=limit),
    )
    return dist.PrefixStore(f"trainer/doctor/{int(nonce.item()):x}", client)


def _finished(work: dist.Work, seconds: float) -> bool:
    """Whether a collective completes within ``seconds`` (polled, so a hung peer cannot hold
    this rank); raises the collective's error if it failed."""
    deadline = time.monotonic() + seconds
    while not work.is_completed():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    work.wait()
    return True


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _missing(store: dist.Store, key: str, world_size: int) -> list[int]:
    return [r for r in range(world_size) if not store.check([f"{key}/{r}"])]


def _gather(store: dist.Store, key: str, world_size: int, limit: float) -> dict[int, Any]:
    """``key/RANK`` of every rank that wrote it within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while _missing(store, key, world_size) and time.monotonic() < deadline:
        time.sleep(0.01)
    present = set(range(world_size)) - set(_missing(store, key, world_size))
    return {r: json.loads(store.get(f"{key}/{r}")) for r in sorted(present)}


def _verdict(store: dist.Store, seconds: float) -> int:
    """Rank 0's exit code, or EXIT_CODE when it gives none in time."""
    deadline = time.monotonic() + seconds
    while not store.check(["verdict"]):
        if time.monotonic() > deadline:
            print(f"doctor: FAIL: no verdict from rank 0 within {seconds:g} s", file=sys.stderr)
            return EXIT_CODE
        time.sleep(0.01)
    return int(store.get("verdict"))


def _encode(results: dict[str, Any]) -> str:
    return json.dumps({k: asdict(v) if isinstance(v, Result) else v for k, v in results.items()})


def _injected(kind: str, rank: int) -> bool:
    """Whether the test-only ``TRAINER_DOCTOR_INJECT`` asks for ``kind@rank`` here; like the
    trainer's injections, only in the first launch attempt."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    return f"{kind}@{rank}" in os.environ.get(INJECT_ENV, "").split(",")


def main(argv: list[str] | None = None) -> int:
    """Check this rank as the config in ``argv`` says; the exit code (0, 2 or EXIT_CODE)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    config = load_config(argv[0], argv[1:])
    device, _, _ = init_distributed()
    code = examine(config, device)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)  # a hung collective may hold the process group
    dist.destroy_process_group()
    return 0


def _size(count: float) -> str:
    """A byte count in binary units (``12.8 MiB``), as disk and GPU memory are quoted."""
    return human_size(count, binary=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as error:
        print(f"doctor: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
