"""Test helper, run as a script (alone or under torchrun): train, and SIGKILL this process right
after optimiser step STEP of epoch EPOCH, as a crash or a pre-empted job would.

    python kill_run.py DATASET OUTPUT_DIR EPOCH STEP '{"epochs": 3, ...}'
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

from mlsa4rec.training.run import train


def main() -> None:
    dataset, output_dir, epoch, step, overrides = sys.argv[1:6]
    torch.set_num_threads(1)

    def on_step(e: int, s: int) -> None:
        if (e, s) == (int(epoch), int(step)):
            os.kill(os.getpid(), signal.SIGKILL)

    train("sasrec", dataset, output_dir, overrides=json.loads(overrides), on_step=on_step)
    sys.exit("kill_run.py: the run finished without reaching the kill step")


if __name__ == "__main__":
    main()
