"""How light the run dashboard is: attaching to a run of 100,000 events, and following a live run.

`python -m bench.dashboard_load [--events 100000] [--follow-s 30] [--out bench/results/dashboard.txt]`

1. Writes a run directory with N events shaped like a long GPU run (steps, a `gpu` reading every 20 steps,
   evals, samples, checkpoints, warnings; about 33 MB for 100,000 events) under a scratch TUNEWIZ_HOME.
2. Attach time, headless: the real TunewizApp in attach mode under Textual's headless driver; the clock
   runs from creating the app to the first frame drawn after the dashboard has folded in every event.
3. Attach time, in a terminal: `python -m tunewiz.engine attach RUN` in a pseudo-terminal (a fresh interpreter:
   imports, the real driver writing escape codes); the clock runs until the header with the last step
   has been written to the terminal.
4. Following: a writer process holds the engine lock and appends events like a live run (4 steps a
   second plus resource readings, evals and samples); the app follows it for `--follow-s` seconds, in the
   terminal, and its CPU time (utime + stime of the app process, from /proc) is divided by the wall time.
   The same is measured for a pace of 20 steps a second.

The machine is shared, so each figure is the median of a few tries; CPU time is what the app itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import pty
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tunewiz.engine.config import presets
from tunewiz.engine.run import rundir
from tunewiz.engine.run.events import EventWriter

ROOT = Path(__file__).resolve().parent.parent

GPU_EVERY = 20
EVAL_EVERY = 500
SAMPLE_EVERY = 2000
CHECKPOINT_EVERY = 1000
PROMPTS = [f"Headline: Company {i} reports results\nPositive or negative?" for i in range(4)]


def _step_event(step: int, total: int, t: float) -> dict:
    loss = 2.2 * (0.6 + 0.4 / (1 + step / 2000)) + 0.05 * ((step * 7919) % 13 - 6) / 6
    return {"type": "step", "step": step, "total_steps": total, "epoch": round(step / (total / 3), 4),
            "loss": round(loss, 4), "learning_rate": 2e-4 * min(1.0, step / 500), "grad_norm": 0.8 + (step % 17) / 40,
            "tokens_per_s": 5100.0 + (step % 50), "samples_per_s": 2.5, "tokens_seen": step * 4096,
            "elapsed_s": round(step / 4, 2), "eta_s": round((total - step) / 4, 1)}


def _gpu_event() -> dict:
    return {"type": "gpu", "devices": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "mem_used_bytes": 41_000_000_000,
                                        "mem_total_bytes": 85_000_000_000, "util_pct": 97, "power_w": 612.0,
                                        "temp_c": 66, "torch_peak_reserved_bytes": 39_000_000_000}],
            "process": {"rss_bytes": 6_100_000_000, "cpu_pct": 101.0, "cpu_count": 16}}


def event_stream(total_events: int):
    """Yield (type, fields) for a long run of about `total_events` events, ending with `finished`."""
    per_step = 1 + 1 / GPU_EVERY + 1 / EVAL_EVERY + 1 / SAMPLE_EVERY + 1 / CHECKPOINT_EVERY
    total = int((total_events - 7) / per_step)
    yield {"type": "started", "pid": 4242, "host": "bench", "run_id": "bench", "version": "0.1.0"}
    yield {"type": "phase", "phase": "load_model", "message": "loading llama-3.1-8b on cuda"}
    yield {"type": "phase", "phase": "prepare_data", "message": "reading and tokenising the dataset"}
    yield {"type": "phase", "phase": "train", "message": f"training {total} steps"}
    yield {"type": "sample", "step": 0, "samples": [{"prompt": p, "answer": "It depends.", "reference": "positive",
                                                     "match": False} for p in PROMPTS]}
    count = 5
    step = 0
    while count < total_events - 1 and step < total:
        step += 1
        yield _step_event(step, total, 0.0)
        count += 1
        if step % GPU_EVERY == 0:
            yield _gpu_event()
            count += 1
        if step % EVAL_EVERY == 0:
            yield {"type": "eval", "step": step, "eval_loss": round(1.6 + 0.5 / (1 + step / 3000), 4)}
            count += 1
        if step % SAMPLE_EVERY == 0:
            yield {"type": "sample", "step": step, "samples": [{"prompt": p, "answer": "positive",
                                                                "reference": "positive", "match": True}
                                                               for p in PROMPTS]}
            count += 1
        if step % CHECKPOINT_EVERY == 0:
            yield {"type": "checkpoint", "step": step, "path": f"/runs/bench/output/checkpoints/checkpoint-{step}"}
            count += 1
    yield {"type": "finished", "status": "completed", "step": step, "metrics": {"train_loss": 1.4}}


def make_run(root: Path, events: int) -> tuple[rundir.RunDir, int, int]:
    """A completed run directory holding `events` events; returns it, the event count and the last step."""
    spec, _ = presets.resolve("demo")
    spec.name = "bench-100k"
    run = rundir.create(spec, root)
    t0 = 1767225600.0
    written, last_step = 0, 0
    with run.events_path.open("w", encoding="utf-8") as handle:
        for seq, event in enumerate(event_stream(events), 1):
            t = t0 + seq * 0.2
            handle.write(json.dumps({"v": 1, "seq": seq, "time": round(t, 3), **event}, ensure_ascii=False) + "\n")
            written += 1
            if event["type"] == "step":
                last_step = event["step"]
    run.update_status(state="completed", started=t0, finished=t0 + written * 0.2, step=last_step,
                      total_steps=last_step, loss=1.4)
    return run, written, last_step


# ---------------------------------------------------------------------------------------------------
# A live run: a writer that holds the lock and appends events at a steady pace.


def writer_main(run_path: Path, rate: float, seconds: float) -> None:
    run = rundir.RunDir(run_path)
    lock = rundir.acquire_lock(run.lock_path)
    writer = EventWriter(run.events_path)
    run.update_status(state="running", pid=os.getpid(), pgid=os.getpgid(0), started=time.time(), finished=None)
    total = int(rate * seconds * 4) + 10
    writer.emit("started", pid=os.getpid(), host="bench", run_id=run.run_id, version="0.1.0")
    writer.emit("phase", phase="train", message=f"training {total} steps")
    start = time.monotonic()
    step = 0
    next_gpu = start
    while time.monotonic() - start < seconds:
        step += 1
        writer.emit("step", **{k: v for k, v in _step_event(step, total, 0).items() if k != "type"})
        if time.monotonic() >= next_gpu:
            writer.emit("gpu", **{k: v for k, v in _gpu_event().items() if k != "type"})
            next_gpu += 5.0
        if step % 200 == 0:
            writer.emit("eval", step=step, eval_loss=1.7)
        if step % 400 == 0:
            writer.emit("sample", step=step, samples=[{"prompt": p, "answer": "positive", "reference": "positive",
                                                       "match": True} for p in PROMPTS])
        time.sleep(max(0.0, start + step / rate - time.monotonic()))
    writer.emit("finished", status="completed", step=step)
    run.update_status(state="completed", finished=time.time(), step=step)
    os.close(lock)


# ---------------------------------------------------------------------------------------------------
# Measurements


async def _attach_headless(run: rundir.RunDir, events: int) -> float:
    from tunewiz.tui.app import TunewizApp
    from tunewiz.tui.screens.dashboard import DashboardScreen
    from tunewiz.tui.services import Services

    start = time.perf_counter()
    app = TunewizApp(Services(runs_root=run.path.parent), attach=run)
    async with app.run_test(size=(120, 40)) as pilot:
        while True:
            screen = app.screen
            if isinstance(screen, DashboardScreen) and screen.view is not None and screen.view.events >= events:
                break
            await asyncio.sleep(0.002)
        await pilot.pause()  # the frame with everything in it
        elapsed = time.perf_counter() - start
    return elapsed


async def _open_from_runs(run: rundir.RunDir, events: int) -> float:
    from tunewiz.tui.app import TunewizApp
    from tunewiz.tui.screens.dashboard import DashboardScreen
    from tunewiz.tui.screens.runs import RunsScreen
    from tunewiz.tui.services import Services

    app = TunewizApp(Services(runs_root=run.path.parent))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("r")
        while not (isinstance(app.screen, RunsScreen) and app.screen.rows):
            await asyncio.sleep(0.01)
        await app.workers.wait_for_complete()
        await pilot.pause()
        index = next(i for i, row in enumerate(app.screen.rows) if row["run_id"] == run.run_id)
        app.screen.query_one("#runs").move_cursor(row=index)
        await pilot.pause()
        start = time.perf_counter()
        await pilot.press("enter")
        while True:
            screen = app.screen
            if isinstance(screen, DashboardScreen) and screen.view is not None and screen.view.events >= events:
                break
            await asyncio.sleep(0.002)
        await pilot.pause()
        return time.perf_counter() - start


def open_from_runs(run: rundir.RunDir, events: int) -> float:
    """Seconds from Enter on the run in the Runs screen of a running app to the frame showing all events."""
    return _in_fresh_interpreter("_open_from_runs", run, events)


def attach_headless(run: rundir.RunDir, events: int) -> float:
    """Seconds from creating the app to the frame showing all events (in a fresh interpreter)."""
    return _in_fresh_interpreter("_attach_headless", run, events)


def _in_fresh_interpreter(measure: str, run: rundir.RunDir, events: int) -> float:
    """What this module's coroutine `measure` returns for `run`, run in a new Python (cold imports, as a user
    starting the app has them)."""
    code = (f"import asyncio; from pathlib import Path; from bench.dashboard_load import {measure};"
            "from tunewiz.engine.run import rundir;"
            f"print(asyncio.run({measure}(rundir.RunDir(Path({str(run.path)!r})), {events})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return float(out.stdout.strip().splitlines()[-1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(TERM="xterm-256color", COLUMNS="120", LINES="40")
    return env


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PtyApp:
    """`python -m tunewiz.engine attach RUN` in a 120x40 pseudo-terminal whose output is read and thrown away."""

    def __init__(self, run: rundir.RunDir) -> None:
        import fcntl
        import struct
        import termios

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "tunewiz.engine", "attach", str(run.path)], stdin=slave,
                                        stdout=slave, stderr=slave, env=_env(), cwd=ROOT, start_new_session=True)
        os.close(slave)
        self.seen = b""

    def read_until(self, needle: bytes, timeout: float) -> float | None:
        """Seconds from the start until `needle` was written to the terminal (None on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.01)
            if ready:
                try:
                    chunk = os.read(self.master, 1 << 16)
                except OSError:
                    return None
                self.seen = (self.seen + chunk)[-200_000:]
                if needle in self.seen:
                    return time.perf_counter() - self.started
        return None

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    os.read(self.master, 1 << 16)
                except OSError:
                    return

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.close(self.master)


def attach_in_terminal(run: rundir.RunDir, last_step: int) -> float:
    app = PtyApp(run)
    try:
        shown = app.read_until(f"step {last_step}/{last_step}".encode(), 120)
        if shown is None:
            raise RuntimeError(f"the header never showed the last step; output ends {app.seen[-800:]!r}")
        return shown
    finally:
        app.close()


def follow_cpu(root: Path, rate: float, seconds: float) -> dict[str, float]:
    """CPU share of one core that the app uses while following a live run written at `rate` steps/s."""
    spec, _ = presets.resolve("demo")
    spec.name = f"bench-live-{rate:g}"
    run = rundir.create(spec, root)
    writer = subprocess.Popen([sys.executable, "-m", "bench.dashboard_load", "--writer", str(run.path),
                               "--rate", str(rate), "--seconds", str(seconds + 25)], env=_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while not run.engine_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        app = PtyApp(run)
        try:
            if app.read_until(b"RUNNING", 60) is None:
                raise RuntimeError(f"the dashboard did not come up: {app.seen[-800:]!r}")
            app.drain(3.0)  # let start-up settle
            cpu0, wall0 = _cpu_seconds(app.process.pid), time.perf_counter()
            app.drain(seconds)
            cpu1, wall1 = _cpu_seconds(app.process.pid), time.perf_counter()
        finally:
            app.close()
    finally:
        writer.terminate()
        writer.wait()
    return {"cpu_s": cpu1 - cpu0, "wall_s": wall1 - wall0, "pct": 100 * (cpu1 - cpu0) / (wall1 - wall0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--follow-s", type=float, default=30.0)
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--writer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=4.0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.writer:
        writer_main(args.writer, args.rate, args.seconds)
        return 0

    home = Path(tempfile.mkdtemp(prefix="tunewiz-bench-"))
    os.environ["TUNEWIZ_HOME"] = str(home)
    root = home / "state" / "runs"
    root.mkdir(parents=True)
    lines = [f"tunewiz dashboard benchmark ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
             f"Python {platform.python_version()}, {os.cpu_count()} cores, load average at start "
             f"{os.getloadavg()[0]:.2f})"]

    run, events, last_step = make_run(root, args.events)
    size_mb = run.events_path.stat().st_size / 1e6
    lines.append(f"run: {events:,} events ({last_step:,} steps, a gpu reading every {GPU_EVERY} steps, evals, "
                 f"samples, checkpoints), events.jsonl {size_mb:.1f} MB")

    opened = [open_from_runs(run, events) for _ in range(args.tries)]
    lines.append(f"open from the Runs screen of a running app (Enter -> frame with all {events:,} events), 120x40: "
                 f"median {statistics.median(opened):.2f} s (tries: {', '.join(f'{t:.2f}' for t in opened)})")
    headless = [attach_headless(run, events) for _ in range(args.tries)]
    lines.append(f"attach, headless app (create app -> frame with all {events:,} events), 120x40: median "
                 f"{statistics.median(headless):.2f} s (tries: {', '.join(f'{t:.2f}' for t in headless)})")
    terminal = [attach_in_terminal(run, last_step) for _ in range(args.tries)]
    lines.append("attach in a terminal (`python -m tunewiz.engine attach RUN` started -> last step on screen), "
                 "120x40: "
                 f"median {statistics.median(terminal):.2f} s (tries: {', '.join(f'{t:.2f}' for t in terminal)})")
    small, small_events, small_last = make_run(root, 200)
    baseline = [attach_in_terminal(small, small_last) for _ in range(args.tries)]
    lines.append(f"  the same with a run of {small_events} events (start-up alone: Python, imports, Textual): median "
                 f"{statistics.median(baseline):.2f} s (tries: {', '.join(f'{t:.2f}' for t in baseline)})")
    print("\n".join(lines), flush=True)

    for rate in (4.0, 20.0):
        result = follow_cpu(root, rate, args.follow_s)
        lines.append(f"following a live run at {rate:g} steps/s (+ a resource reading every 5 s) for "
                     f"{result['wall_s']:.0f} s in a terminal: app CPU {result['cpu_s']:.2f} s = "
                     f"{result['pct']:.1f}% of one core")
        print(lines[-1], flush=True)

    lines.append(f"load average at the end: {os.getloadavg()[0]:.2f} (the machine is shared: compare tries, not runs)")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text + f"Command: python -m bench.dashboard_load --events {args.events} --follow-s "
                                   f"{args.follow_s:g} --out {args.out}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
