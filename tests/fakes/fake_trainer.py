"""A fake fine-tune: holds GiB of the simulated card (:mod:`tests.fakes.simcard`) as a training run would.

Run it under a lease, like the real thing::

    STANDIN_SIMCARD=/tmp/card.json onecard lease --gib 16 -- \\
        python -m tests.fakes.fake_trainer --gib 16 --until /tmp/trainer.stop

It takes its memory at start (CUDA out of memory, exit 1, when the card cannot hold it, as PyTorch
would), writes ``--ready FILE`` once it holds it, and trains until ``--until FILE`` exists or it is
signalled. Its memory goes back to the card when the process exits, as the driver frees it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.fakes.simcard import ENV_LEDGER, GIB, CudaOutOfMemory, Ledger, hold


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fake_trainer")
    p.add_argument("--gib", type=float, required=True, help="GiB of the card to hold")
    p.add_argument("--until", type=Path, required=True, help="stop when this file exists")
    p.add_argument("--ready", type=Path, default=None, help="written once the memory is held")
    p.add_argument("--ledger", default=os.environ.get(ENV_LEDGER), help=f"the card (default ${ENV_LEDGER})")
    args = p.parse_args(argv)
    if not args.ledger:
        print(f"fake_trainer: no simulated card: set {ENV_LEDGER} or --ledger", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        hold(Ledger(args.ledger), pid=os.getpid(), name="fake-trainer", nbytes=int(args.gib * GIB))
    except CudaOutOfMemory as exc:
        print(exc.lines[-1], file=sys.stderr)
        return 1
    print(f"fake_trainer: holding {args.gib:g} GiB of the card (pid {os.getpid()})", flush=True)
    if args.ready is not None:
        args.ready.write_text(str(os.getpid()))
    while not args.until.exists():
        time.sleep(0.05)
    print("fake_trainer: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
