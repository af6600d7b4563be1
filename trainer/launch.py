"""torchrun for runs whose nodes may leave and join: the same arguments, store sharing off.

    python -m trainer.launch --nnodes=1:4 --nproc_per_node=8 --max-restarts=10 \\
        --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 --rdzv-id=RUN -m trainer.pretrain ...

torchrun (torch 2.13) shares its rank-0 agent's store with the workers and keeps that
store's address from the first rendezvous round. A node that joins in a later round finds
no address published for that round and its agent waits until the rendezvous times out, so
a replacement node never starts. With ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` each round
publishes a fresh address and rank 0 of each round hosts its own store (docs/TRAINER.md).
"""

from __future__ import annotations

import os

from torch.distributed.run import main as torchrun


def main(argv: list[str] | None = None) -> None:
    """Run torchrun with ``argv`` (default: the command line) and per-round stores."""
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    torchrun(argv)


if __name__ == "__main__":
    main()
