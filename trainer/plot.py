"""Draw a run's loss and throughput curves: ``python -m trainer.plot RUN_DIR [-o OUT.png]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.metrics import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write loss, and tokens/s with MFU, per step to a PNG (default RUN_DIR/metrics.png).

    Rollbacks and resumes are drawn as vertical lines at the step where they happened.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    steps, events = read_metrics(run_dir)
    if not steps:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no step records yet")
    x = list(steps)
    fig, (loss_ax, speed_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    loss_ax.plot(x, [steps[s]["loss"] for s in x], lw=1)
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(str(run_dir))
    speed_ax.plot(x, [steps[s]["tokens_per_s"] for s in x], lw=1, color="tab:green")
    speed_ax.set_ylabel("tokens/s")
    speed_ax.set_xlabel("step")
    mfu = [steps[s].get("mfu") for s in x]
    if any(m is not None for m in mfu):
        mfu_ax = speed_ax.twinx()
        mfu_ax.plot(
            x, [100 * m if m is not None else float("nan") for m in mfu], lw=1, color="tab:orange"
        )
        mfu_ax.set_ylabel("MFU %")
    colors = {"rollback": "tab:red", "resume": "tab:gray", "oom": "tab:purple"}
    for event in events:
        if event["event"] in colors:
            for ax in (loss_ax, speed_ax):
                ax.axvline(event["step"], color=colors[event["event"]], lw=0.8, ls="--")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.plot", description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("-o", "--out", help="PNG path [default: RUN_DIR/metrics.png]")
    args = parser.parse_args(argv)
    try:
        out = plot_run(args.run_dir, args.out)
    except (OSError, ValueError) as error:
        print(f"trainer.plot: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
