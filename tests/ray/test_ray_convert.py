"""``convert --engine ray`` on a real 2-node Ray cluster gives the bytes of a local run.

The cluster (two ``ray start --block`` nodes of one CPU each) and every driver run inside a
private network namespace, so all traffic stays on its own 127.0.0.1. One cluster serves the
whole module; the tests that damage it (a node killed, a mismatched node) come last.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))
from convert_helpers import TOKENIZER, dataset_files, run_convert, sample_docs, write_jsonl  # noqa: E402

from streamshards.merge import merge  # noqa: E402

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent
FAST_HC = json.dumps(
    {
        "health_check_period_ms": 1000,
        "health_check_timeout_ms": 1000,
        "health_check_failure_threshold": 3,
        "health_check_initial_delay_ms": 1000,
    }
)
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
ADDRESS = "127.0.0.1:6379"
# moto's S3 server, inside the namespace: every node and driver finds it through the
# standard endpoint variable, as a real cluster's nodes would find their object store.
S3_ENV = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:5000",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
S3_SCRIPT = """
import pathlib, sys
import boto3
s3 = boto3.client("s3")
if sys.argv[1] == "put":
    s3.create_bucket(Bucket="corpus")
    for name in sys.argv[2:]:
        s3.upload_file(name, "corpus", "c4/" + pathlib.Path(name).name)
else:
    prefix, folder = sys.argv[2], pathlib.Path(sys.argv[3])
    folder.mkdir(parents=True)
    for item in s3.list_objects_v2(Bucket="corpus", Prefix=prefix).get("Contents", []):
        s3.download_file("corpus", item["Key"], str(folder / item["Key"][len(prefix):]))
"""


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc), deepest last."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
                queue.append(int(entry.name))
    return found


def _kill_tree(pid: int) -> None:
    """SIGTERM ``pid``, then SIGKILL it and whatever is left of its process tree."""
    tree = _children(pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    time.sleep(1)
    for each in [pid, *tree, *_children(pid)]:
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Cluster:
    """Ray nodes in a private network namespace held open by a sleeping process."""

    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # socket paths must stay short
        self.holder = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep 100000"]
        )
        self.nodes: list[subprocess.Popen] = []
        time.sleep(0.3)
        self.s3 = subprocess.Popen(
            self.inside([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", "5000"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def env(self, **extra: str) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return {**environ, **RAY_ENV, **S3_ENV, **extra}

    def python(self, code: str, *args) -> None:
        """Run ``code`` in the namespace (where the S3 server is)."""
        run = subprocess.run(
            self.inside([sys.executable, "-c", code, *map(str, args)]),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-3000:]

    def inside(self, args: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-n", *args]

    def start_node(self, head: bool, ports: int = 20100, **env: str) -> subprocess.Popen:
        common = ["--num-cpus=1", f"--temp-dir={self.temp}", "--object-store-memory=100000000"]
        if head:
            args = ["--head", "--port=6379", "--include-dashboard=false", "--no-monitor"]
            args += ["--min-worker-port=20000", "--max-worker-port=20099"]
            args += [f"--system-config={FAST_HC}"]
        else:
            args = [f"--address={ADDRESS}", "--include-log-monitor=false"]
            args += [f"--object-manager-port={ports + 100}", f"--node-manager-port={ports + 101}"]
            args += [f"--min-worker-port={ports}", f"--max-worker-port={ports + 99}"]
            args += [f"--dashboard-agent-listen-port={ports + 102}"]
            args += [f"--dashboard-agent-grpc-port={ports + 103}"]
            args += [f"--runtime-env-agent-port={ports + 104}"]
            args += [f"--metrics-export-port={ports + 105}"]
        node = subprocess.Popen(
            self.inside([str(BIN / "ray"), "start", "--block", *common, *args]),
            env=self.env(**env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.nodes.append(node)
        return node

    def wait_for_nodes(self, count: int) -> None:
        code = (
            f"import ray, time; ray.init(address='{ADDRESS}', log_to_driver=False)\n"
            "end = time.time() + 60\n"
            f"while sum(n['Alive'] for n in ray.nodes()) != {count} and time.time() < end:\n"
            "    time.sleep(0.2)\n"
            f"assert sum(n['Alive'] for n in ray.nodes()) == {count}\n"
        )
        for _ in range(30):
            run = subprocess.run(
                self.inside(["timeout", "-k", "5", "90", sys.executable, "-c", code]),
                env=self.env(),
                capture_output=True,
                text=True,
            )
            if run.returncode == 0:
                return
            time.sleep(1)
        raise AssertionError(f"the Ray cluster did not come up: {run.stderr[-2000:]}")

    def convert(self, *args, env: dict[str, str] | None = None, wait: bool = True, cmd="convert"):
        """``streamshards convert ARGS --engine ray`` as a driver process in the namespace."""
        command = [str(BIN / "streamshards"), cmd]
        command += [str(a) for a in args] + ["--engine", "ray"]
        driver = subprocess.Popen(
            self.inside(command),
            env=self.env(RAY_ADDRESS=ADDRESS, **(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if not wait:
            return driver
        try:
            out, err = driver.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            driver.kill()
            out, err = driver.communicate()
        return driver.returncode, out + err

    def close(self) -> None:
        for node in reversed(self.nodes):
            _kill_tree(node.pid)
        _kill_tree(self.s3.pid)
        self.holder.kill()
        self.holder.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster()
    try:
        cluster.start_node(head=True)
        time.sleep(2)
        cluster.worker = cluster.start_node(head=False)
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    """The bundled corpus split into four files of three encodings, with some duplicates."""
    folder = tmp_path_factory.mktemp("corpus")
    docs = sample_docs(600)
    return [
        write_jsonl(folder / "part-0.jsonl.gz", docs[:200], "gzip"),
        write_jsonl(folder / "part-1.jsonl", docs[200:350] + docs[:20]),
        write_jsonl(folder / "part-2.jsonl.zst", docs[350:500], "zstd"),
        write_jsonl(folder / "part-3.jsonl", docs[500:]),
    ]


TOKENIZED = ["--tokenizer", TOKENIZER, "--seq-len", "128", "--size-limit", "24KB"]


def _same_as_local(cluster, corpus, out: Path, options: list, env=None) -> str:
    run_convert(*corpus, out / "local", "--workers", "2", *options)
    code, output = cluster.convert(*corpus, out / "ray", *options, env=env)
    assert code == 0, output
    local = dataset_files(out / "local")
    assert len(local) > 3
    assert dataset_files(out / "ray") == local
    return output


@pytest.mark.parametrize(
    "options",
    [
        [*TOKENIZED, "--dedup", "--tail", "pad", "--unit-size", "16KB"],
        [*TOKENIZED, "--tail", "drop", "--unit-size", "200KB", "--min-chars", "300"],
        ["--keep-fields", "url,timestamp", "--dedup", "--size-limit", "40KB", "--unit-size", "8KB"],
        ["--size-limit", "100KB", "--unit-size", "64KB"],
    ],
    ids=["tokens-dedup-pad", "tokens-drop", "raw-dedup", "raw"],
)
def test_two_nodes_write_the_bytes_of_a_local_run(cluster, corpus, tmp_path, options):
    _same_as_local(cluster, corpus, tmp_path, options)


def test_without_ray_address_a_local_ray_is_started(corpus, tmp_path):
    options = [*TOKENIZED, "--unit-size", "64KB"]
    run_convert(*corpus, tmp_path / "local", "--workers", "2", *options)
    args = [str(BIN / "streamshards"), "convert", *map(str, corpus), str(tmp_path / "ray")]
    command = " ".join(shlex.quote(a) for a in [*args, *map(str, options), "--engine", "ray"])
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    temp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # the local Ray's session files
    try:
        run = subprocess.run(
            ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {command}"],
            env={**environ, **RAY_ENV, "RAY_TMPDIR": temp},
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "on ray" in run.stdout
    assert dataset_files(tmp_path / "ray") == dataset_files(tmp_path / "local")


def test_a_task_failing_on_its_first_attempt_is_retried_to_the_same_bytes(
    cluster, corpus, tmp_path
):
    faults = tmp_path / "faults"
    env = {
        "STREAMSHARDS_CONVERT_FAIL_ONCE": "read-000001,shard-000002",
        "STREAMSHARDS_CONVERT_FAULT_DIR": str(faults),
    }
    options = [*TOKENIZED, "--unit-size", "32KB"]
    output = _same_as_local(cluster, corpus, tmp_path, options, env)
    assert "on ray (2 retried)" in output
    assert sorted(p.name for p in faults.iterdir()) == ["read-000001", "shard-000002"]


def test_inputs_and_out_on_s3_give_the_bytes_of_a_local_run(cluster, corpus, tmp_path):
    options = [*TOKENIZED, "--dedup", "--unit-size", "32KB"]
    run_convert(*corpus, tmp_path / "local", "--workers", "2", *options)
    cluster.python(S3_SCRIPT, "put", *corpus)
    code, output = cluster.convert("s3://corpus/c4/part-*.jsonl*", "s3://corpus/out", *options)
    assert code == 0, output
    cluster.python(S3_SCRIPT, "get", "out/", tmp_path / "ray")
    local, ray = dataset_files(tmp_path / "local"), dataset_files(tmp_path / "ray")
    local_index, ray_index = json.loads(local.pop("index.json")), json.loads(ray.pop("index.json"))
    assert len(local) > 3 and ray == local  # the same shards, and nothing else left in OUT
    files = [i.pop("file") for i in ray_index["provenance"]["inputs"]]
    assert files == [f"s3://corpus/c4/{p.name}" for p in corpus]
    for index in (local_index, ray_index):
        index["provenance"].pop("job")  # it covers where the inputs are
        for item in index["provenance"]["inputs"]:
            item.pop("file", None)
    assert ray_index == local_index


def test_merge_on_ray_writes_the_bytes_of_a_local_merge(cluster, corpus, tmp_path):
    for number, path in enumerate(corpus[:3]):
        run_convert(path, tmp_path / "parts" / f"p{number}", "--size-limit", "60KB")
    merge([tmp_path / "parts"], tmp_path / "one", size_limit="100KB")
    code, output = cluster.convert(
        tmp_path / "parts", "--out", tmp_path / "ray", "--size-limit", "100KB", cmd="merge"
    )
    assert code == 0, output
    one = dataset_files(tmp_path / "one")
    assert len(one) > 3 and dataset_files(tmp_path / "ray") == one


def _wait_for(predicate, seconds: float = 60) -> None:
    end = time.time() + seconds
    while not predicate():
        assert time.time() < end, "timed out"
        time.sleep(0.1)


def test_a_driver_killed_mid_job_is_resumed_by_the_same_command(cluster, corpus, tmp_path):
    options = [*TOKENIZED, "--unit-size", "32KB"]
    run_convert(*corpus, tmp_path / "local", "--workers", "2", *options)
    faults = tmp_path / "faults"
    stall = {
        "STREAMSHARDS_CONVERT_STALL_ONCE": "shard-*:2",
        "STREAMSHARDS_CONVERT_FAULT_DIR": str(faults),
    }
    driver = cluster.convert(*corpus, tmp_path / "ray", *options, env=stall, wait=False)
    shards_done = tmp_path / "ray" / ".convert-work" / "shards"
    _wait_for(lambda: shards_done.is_dir() and any(shards_done.iterdir()))
    os.kill(driver.pid, signal.SIGKILL)
    driver.communicate()
    assert not (tmp_path / "ray" / "index.json").exists()
    code, output = cluster.convert(*corpus, tmp_path / "ray", *options)
    assert code == 0, output
    assert "reused from an interrupted run" in output and "(0 reused" not in output
    assert dataset_files(tmp_path / "ray") == dataset_files(tmp_path / "local")


def test_a_worker_node_lost_mid_job_still_gives_the_same_bytes(cluster, corpus, tmp_path):
    options = [*TOKENIZED, "--unit-size", "32KB"]
    run_convert(*corpus, tmp_path / "local", "--workers", "2", *options)
    faults = tmp_path / "faults"
    stall = {
        "STREAMSHARDS_CONVERT_STALL_ONCE": "shard-*:3",
        "STREAMSHARDS_CONVERT_FAULT_DIR": str(faults),
    }
    driver = cluster.convert(*corpus, tmp_path / "ray", *options, env=stall, wait=False)
    # Both nodes are in a stalled shard task: kill the worker node's raylet and its workers.
    _wait_for(lambda: faults.is_dir() and len(list(faults.iterdir())) >= 2)
    raylets = [
        pid
        for pid in _children(cluster.worker.pid)
        if "raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    ]
    assert raylets
    for pid in raylets:
        for each in [pid, *_children(pid)]:
            os.kill(each, signal.SIGKILL)
    out, err = driver.communicate()
    assert driver.returncode == 0, out + err
    assert "(0 retried)" not in out  # the lost node's tasks ran again
    assert dataset_files(tmp_path / "ray") == dataset_files(tmp_path / "local")


def test_a_node_with_other_library_versions_is_refused_by_name(cluster, corpus, tmp_path):
    fake = tmp_path / "site" / "zstandard-0.0.1.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: zstandard\nVersion: 0.0.1\n")
    cluster.start_node(head=False, ports=20300, PYTHONPATH=str(fake.parent))
    cluster.wait_for_nodes(2)  # the head and the new node (the old worker is dead)
    code, output = cluster.convert(*corpus, tmp_path / "ray", "--unit-size", "64KB")
    assert code != 0
    assert "zstandard 0.0.1" in output and "other library versions" in output
    assert not (tmp_path / "ray" / "index.json").exists()
