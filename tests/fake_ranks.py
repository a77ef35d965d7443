"""Stands in for `accelerate launch` in CPU tests of the multi-GPU supervisor (engine/run/worker.py).

`python -m tests.fake_ranks supervise N RUN_DIR` runs the engine's supervisor for RUN_DIR as if the
machine had N GPUs, with this module's `launch` as its accelerate. `launch N RUN_DIR [--resume]`
starts N engine ranks (`python -m tunewiz.engine.run.worker RUN_DIR --rank-worker`) with RANK, LOCAL_RANK and
WORLD_SIZE set as accelerate sets them, passes SIGTERM on as torchrun does, and exits with the first
non-zero exit code. The ranks run the stand-in trainer (TUNEWIZ_TRAINER).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def launch(world: int, run_dir: str, extra: list[str]) -> int:
    # Sessions of their own, as torchrun starts them: a signal to the engine's group does not reach them.
    ranks = [subprocess.Popen([sys.executable, "-m", "tunewiz.engine.run.worker", run_dir, "--rank-worker", *extra],
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world)},
                              start_new_session=True)
             for r in range(world)]

    def forward(signum: int, _frame: object) -> None:
        for rank in ranks:
            rank.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    while None in (codes := [rank.poll() for rank in ranks]):  # poll every rank, each time
        if any(codes):  # like torchrun: one rank failed, end the others
            forward(signal.SIGTERM, None)
            break
        time.sleep(0.05)
    codes = [rank.wait() for rank in ranks]
    return next((code for code in codes if code), 0)


def supervise(world: int, run_dir: str, extra: list[str]) -> int:
    from tunewiz.engine.run import worker
    from tunewiz.engine.training import distributed

    worker._launch_plan = lambda ctx: distributed.LaunchPlan(gpu_ids=list(range(world)))
    distributed.accelerate_command = lambda plan, run, more=None: [
        sys.executable, "-m", "tests.fake_ranks", "launch", str(world), run, *(more or [])]
    return worker.main([run_dir, *extra])


if __name__ == "__main__":
    mode, count, run_dir, *rest = sys.argv[1:]
    sys.exit((launch if mode == "launch" else supervise)(int(count), run_dir, rest))
