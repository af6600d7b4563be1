"""Trainer throughput: tokens/s and MFU of gpt-125m, gpt-350m and gpt-1b at sequence 2048.

Each model runs the trainer's own step (FSDP2 over one GPU, bf16 compute with fp32
reduction, gradient accumulation over two microbatches, clipping, fused AdamW) on random
tokens, eager and with ``torch.compile``; eager is the baseline beside each compiled row.
MFU = flops_per_token (6N + 12 L D T) x tokens/s / peak bf16 FLOP/s. Targets: 40 % MFU on
one H100 (about 400k tokens/s for 125M); LLM Foundry publishes 41.8 % for 1B on 8 x H100.

    python benchmarks/bench_trainer.py [--models gpt-125m,gpt-1b] [--plot out.png]
    python benchmarks/bench_trainer.py --smoke     # a tiny CPU run of the same code path
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from functools import partial

import torch

from trainer.config import load_config
from trainer.fsdp import init_distributed, shard_model
from trainer.metrics import peak_flops, peak_memory_gb
from trainer.model import ModelConfig, Transformer, flops_per_token
from trainer.pretrain import build_optimizer, forward_backward

# measured on one H200: twice these sizes gave 1-6 % more tokens/s at every model
MICROBATCH = {"gpt-125m": 32, "gpt-350m": 16, "gpt-1b": 8}
BUDGET_SECONDS = 450  # stop starting new rows past this, so the script ends within 8 minutes


def measure(name: str, compile: bool, device: torch.device, smoke: bool, steps: int) -> dict:
    """Tokens/s, MFU and peak memory of ``steps`` timed steps after warm-up steps."""
    config = load_config(name, ["data.local=unused"])
    model_fields = {**config["model"], "vocab_size": 50304}
    if smoke:
        model_fields.update(vocab_size=512, seq_len=128, dim=64, n_layers=2, n_heads=4)
    model_config = ModelConfig(**model_fields)
    with torch.device("meta"):
        model = Transformer(model_config)
    model = shard_model(model, device, bf16=device.type == "cuda", seed=0, compile=compile)
    optimizer = build_optimizer(model, config["optim"], device)
    microbatch = 2 if smoke else MICROBATCH[name]
    batch = 2 * microbatch
    seq = model_config.seq_len
    tokens = torch.randint(0, model_config.vocab_size, (batch, seq + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    step = partial(forward_backward, model, inputs, targets, microbatch, batch * seq)

    def train_step() -> None:
        step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup = 1 if smoke else 3
    compile_started = time.perf_counter()
    for _ in range(warmup):
        train_step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - compile_started
    started = time.perf_counter()
    for _ in range(steps):
        train_step()
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    tokens_per_s = batch * seq / seconds
    peak = peak_flops(device, None)
    result = {
        "model": name,
        "compile": compile,
        "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token(model_config) * tokens_per_s / peak if peak else None,
        "peak_mem_gb": peak_memory_gb(device),
        "warmup_s": warmup_seconds,
    }
    return result


def release(device: torch.device) -> None:
    """Free the last row's model and optimizer before the next row measures its peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt-125m,gpt-350m,gpt-1b")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, eager only")
    parser.add_argument("--plot", help="write a bar chart of tokens/s and MFU to this PNG")
    args = parser.parse_args()

    device, _, _ = init_distributed()
    if device.type != "cuda" and not args.smoke:
        print("no GPU here: run with --smoke for a CPU check of the code path", file=sys.stderr)
        return 2
    names = ["tiny"] if args.smoke else args.models.split(",")
    modes = [False] if args.smoke else [False, True]
    if args.smoke:
        print("SMOKE MODE: a tiny model on CPU; these figures say nothing about GPU speed.")
    else:
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    began = time.perf_counter()
    rows = []
    for name in names:
        for compile in modes:
            if time.perf_counter() - began > BUDGET_SECONDS:
                print(f"skipped {name} compile={compile}: time budget spent")
                continue
            rows.append(measure(name, compile, device, args.smoke, 2 if args.smoke else args.steps))
            print_row(rows[-1], rows)
            release(device)
    if args.plot:
        plot(rows, args.plot)
    print(f"total {time.perf_counter() - began:.0f} s")
    return 0


def print_row(row: dict, rows: list[dict]) -> None:
    if len(rows) == 1:
        print(
            f"{'model':<10} {'compile':<8} {'tokens/s':>12} {'MFU':>7} {'vs eager':>9} "
            f"{'peak GB':>8} {'warm-up s':>10}"
        )
    eager = next((r for r in rows if r["model"] == row["model"] and not r["compile"]), None)
    speedup = row["tokens_per_s"] / eager["tokens_per_s"] if eager else float("nan")
    mfu = f"{row['mfu'] * 100:6.1f}%" if row["mfu"] is not None else f"{'-':>7}"
    print(
        f"{row['model']:<10} {str(row['compile']):<8} {row['tokens_per_s']:>12,.0f} {mfu} "
        f"{speedup:>8.2f}x {row['peak_mem_gb']:>8.1f} {row['warmup_s']:>10.1f}",
        flush=True,
    )


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{'compiled' if r['compile'] else 'eager'}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(labels, [r["tokens_per_s"] for r in rows])
    ax.set_ylabel("tokens/s")
    for i, r in enumerate(rows):
        if r["mfu"] is not None:
            ax.annotate(
                f"{r['mfu'] * 100:.1f}% MFU", (i, r["tokens_per_s"]), ha="center", va="bottom"
            )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
