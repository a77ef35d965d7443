"""The `tunewiz` command. Bare, it opens the wizard; subcommands drive the same engine code headlessly.

Headless commands never import textual, and import torch only when they must.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tunewiz.engine import __version__, hints, locations
from tunewiz.engine.cli import coach as cli_coach
from tunewiz.engine.cli import completion
from tunewiz.engine.cli import data as cli_data
from tunewiz.engine.cli import hardware as cli_hw
from tunewiz.engine.cli import model as cli_model
from tunewiz.engine.config import presets
from tunewiz.engine.config.spec import SpecError
from tunewiz.engine.errors import EXIT_ERROR, EXIT_FAILED, EXIT_INTERRUPTED, TunewizError
from tunewiz.engine.fileio import DISK_FULL_ERRNOS, free_bytes
from tunewiz.engine.render import duration, format_event
from tunewiz.engine.run import curves, launcher, rundir
from tunewiz.engine.run.events import EventReader
from tunewiz.engine.run.worktime import LossScan

FOLLOW_INTERVAL_S = 0.5


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    print(f"tunewiz: {message}", file=sys.stderr)
    return code


def follow(run: rundir.RunDir, from_start: bool = True, as_json: bool = False,
           until_finished: bool = True, offset: int | None = None) -> str:
    """Print the run's events as they come; return the final state once the engine is gone.

    The end is read from the lock and status.json, not from a `finished` event: a resumed run's file
    holds the `finished` of each earlier engine life. `offset` starts reading at that byte.
    """
    reader = EventReader(run.events_path)
    if offset is not None:
        reader.offset = offset
    elif not from_start:
        reader.offset = run.events_path.stat().st_size if run.events_path.exists() else 0
    while True:
        # Read the state before the events: once it says the engine is gone, this read gets the rest.
        state = run.state()
        result = reader.poll()
        if result.reset:
            print("-- events file was truncated; reading it again from the start --", flush=True)
        for event in result.events:
            if as_json:
                print(json.dumps({"v": event.v, "seq": event.seq, "time": event.time, "type": event.type,
                                  **event.data}), flush=True)
            else:
                print(format_event(event), flush=True)
        if state in ("dead", *rundir.FINAL_STATES):
            if state == "dead":
                print(_dead_engine_message(run), flush=True)
            return state
        if not until_finished:
            return state
        finishing = any(event.type == "finished" for event in result.events)
        time.sleep(FOLLOW_INTERVAL_S / 10 if finishing else FOLLOW_INTERVAL_S)


def _dead_engine_message(run: rundir.RunDir) -> str:
    """What to say about an engine that is gone without a `finished` event: its last words from
    engine.log (why it died before it could record anything), and what to do."""
    started = any(event.type == "started" for event in EventReader(run.events_path).read_all())
    last = _log_last_line(run)
    if not started and last:
        return (f"the engine exited before it started: {last}\n"
                f"its full output is in {run.log_path}; fix that, then: {hints.command(f'resume {run.run_id}')}")
    said = f"; engine.log ends with: {last}" if last else ""
    return f"the engine is gone without finishing (killed?){said}. Resume it: {hints.command(f'resume {run.run_id}')}"


def _log_last_line(run: rundir.RunDir, tail_bytes: int = 8192) -> str:
    try:
        with run.log_path.open("rb") as handle:
            handle.seek(max(0, run.log_path.stat().st_size - tail_bytes))
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def _follow_with_stop_on_ctrl_c(run: rundir.RunDir, offset: int | None = None) -> int:
    """Follow a run in the foreground: the first Ctrl-C asks for a graceful stop, the second withdraws
    that request and detaches."""
    presses = 0

    def on_interrupt(_signum: int, _frame: object) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            run.request_stop("ctrl-c")
            print("\nstopping after this step (a checkpoint is saved); Ctrl-C again to detach and leave "
                  "the run going", file=sys.stderr, flush=True)
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        state = follow(run, offset=offset)
    except KeyboardInterrupt:
        run.stop_path.unlink(missing_ok=True)  # the engine reads it at the end of a step: withdrawn in time
        print(f"\ndetached; the stop request is withdrawn and the run goes on (unless it had already begun "
              f"stopping). Follow it: {hints.command(f'tail {run.run_id} -f')}", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0 if state in ("completed", "cancelled") else EXIT_FAILED


def cmd_train(args: argparse.Namespace) -> int:
    from tunewiz.engine.run import preflight

    if not args.print_launch and (args.hosts != 1 or args.gpus_per_host is not None or args.main_ip):
        return _fail("--hosts, --gpus-per-host and --main-ip go with --print-launch")
    overrides = [*(args.set or []), *([f"name={json.dumps(args.name)}"] if args.name is not None else [])]
    spec, source = presets.resolve(args.preset, overrides)  # --name is checked like every spec key
    if spec.model.trust_remote_code and not args.trust_remote_code:
        return _fail(f"{args.preset} sets model.trust_remote_code: loading the model would run Python code from its "
                     "folder or hub repo\nhint: if you trust that code, add --trust-remote-code; otherwise set "
                     "model.trust_remote_code = false")
    if args.print_launch:
        from tunewiz.engine.training import distributed

        _run, text = distributed.prepare_launch(spec, source, args.hosts, args.gpus_per_host, args.main_ip)
        print(text)
        return 0
    stats = preflight.check(spec, on_progress=lambda msg: print(msg, flush=True))
    print(f"data: {stats['train_examples']} training examples ({stats['format']}), "
          f"{stats['dropped_total']} rows skipped, {stats['truncated']} truncated")
    run = rundir.create(spec, trust_remote_code=args.trust_remote_code)
    try:
        pid = launcher.launch(run)
    except BaseException:
        shutil.rmtree(run.path, ignore_errors=True)  # no engine ever ran: leave no empty run behind
        raise
    print(f"run {run.run_id} started (engine pid {pid}); files in {run.path}")
    if args.detach:
        print(f"follow it: {hints.command(f'tail {run.run_id} -f')}    stop it: {hints.command(f'stop {run.run_id}')}")
        return 0
    return _follow_with_stop_on_ctrl_c(run)


def cmd_resume(args: argparse.Namespace) -> int:
    run = rundir.find(args.run)
    state = run.state()
    if state in rundir.LIVE_STATES:
        return _fail(f"run {run.run_id} is still {state}; nothing to resume")
    if state == "completed":
        return _fail(f"run {run.run_id} completed; relaunch it instead: {hints.command(f'train {run.spec_path}')}")
    offset = run.events_path.stat().st_size if run.events_path.exists() else 0  # follow only the new engine
    launcher.launch(run, resume=True)
    print(f"resuming run {run.run_id}")
    if args.detach:
        return 0
    return _follow_with_stop_on_ctrl_c(run, offset)


def cmd_runs(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for run in rundir.list_runs():
        status = run.status()
        state = run.state()
        scan = LossScan(run.events_path)  # the training time (resumes added up) and the last loss, from the events
        scan.update()
        loss = status.get("loss") if status.get("loss") is not None else scan.last
        rows.append({"run_id": run.run_id, "state": state, "name": status.get("name"),
                     "model": status.get("model"), "method": status.get("method"),
                     "step": status.get("step"), "total_steps": status.get("total_steps"),
                     "loss": loss, "started": status.get("started") or status.get("created"),
                     "duration_s": scan.worked(time.time() if state in ("running", "stopping") else None),
                     "alerts": curves.alert_codes(run.events_path)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no runs yet; start one with: {hints.command('train demo')}")
        return 0
    print(f"{'RUN':<36} {'STATE':<10} {'MODEL':<24} {'STEP':>11} {'LOSS':>8} {'TIME':>7}  ALERTS")
    for row in rows:
        step = f"{row['step'] or 0}/{row['total_steps'] or '?'}"
        loss = f"{row['loss']:.4f}" if isinstance(row["loss"], (int, float)) else "-"
        print(f"{row['run_id']:<36} {row['state']:<10} {str(row['model'])[:24]:<24} {step:>11} {loss:>8} "
              f"{duration(row['duration_s']):>7}  {', '.join(row['alerts']) or '-'}")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    run = rundir.find(args.run)
    try:
        state = follow(run, as_json=args.json, until_finished=args.follow)
    except KeyboardInterrupt:
        return 0
    return 0 if state != "failed" else EXIT_FAILED


def cmd_attach(args: argparse.Namespace) -> int:
    """Open the run's dashboard; without the terminal app installed, follow it as plain text."""
    run = rundir.find(args.run)
    try:
        from tunewiz.tui.app import run_app  # imported here only: the headless commands never load textual
    except ImportError:
        print("the terminal app is not installed; following the run as plain text", file=sys.stderr)
        return cmd_tail(argparse.Namespace(run=str(run.path), json=False, follow=True))
    return run_app(attach=run)


def cmd_stop(args: argparse.Namespace) -> int:
    run = rundir.find(args.run)
    outcome = launcher.stop(run, grace_s=args.wait, on_progress=lambda msg: print(msg, flush=True))
    if outcome == "not running":
        print(f"run {run.run_id} is not running ({run.state()})")
        return 0
    print(f"run {run.run_id}: {outcome}; state {run.state()}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tunewiz.engine.use import export

    run = rundir.find(args.run)
    out = Path(args.out).expanduser().resolve() if args.out else None

    def say(message: str) -> None:
        print(message, flush=True)

    if args.merged and args.gguf:
        return _fail("choose one of --merged and --gguf")
    if args.gguf:
        result = export.export_gguf(run, args.gguf, out, on_progress=say, verify_limit=args.verify_limit)
    elif args.merged:
        result = export.export_merged(run, out, args.dtype, on_progress=say, verify_limit=args.verify_limit)
    else:
        print(f"adapter copied to {export.export_adapter(run, out)}")
        return 0
    for line in result.lines:
        print(line)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    found = presets.list_presets()
    if args.json:
        print(json.dumps([{"name": p.name, "description": p.description, "origin": p.origin,
                           "path": str(p.path)} for p in found], indent=1))
        return 0
    width = max((len(p.name) for p in found), default=4)
    for p in found:
        note = "  (replaces the built-in of this name: `tunewiz train` runs this one)" if p.shadows else ""
        print(f"{p.name:<{width}}  {p.origin:<8}  {p.description}{note}")
    return 0


def cmd_presets_save(args: argparse.Namespace) -> int:
    path = presets.save_user_preset(rundir.find(args.run).load_spec(), args.name)
    print(f"saved {path}\nrun it with: {hints.command(f'train {args.name}')}")
    return 0


def cmd_presets_mv(args: argparse.Namespace) -> int:
    print(f"renamed to {presets.rename_user_preset(args.name, args.new)}")
    return 0


def cmd_presets_rm(args: argparse.Namespace) -> int:
    print(f"deleted {presets.delete_user_preset(args.name)}")
    return 0


def cmd_locate(args: argparse.Namespace) -> int:
    places = {"config": locations.config_dir, "state": locations.state_dir, "data": locations.data_dir,
              "cache": locations.cache_dir, "runs": locations.runs_dir, "presets": locations.user_presets_dir}
    if args.what:
        print(places[args.what]())
    else:
        for name, getter in places.items():
            print(f"{name:<8} {getter()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunewiz",
        description="Fine-tune an LLM from your terminal. Run `tunewiz` alone for the guided wizard.",
    )
    parser.add_argument("--version", action="version", version=f"tunewiz {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="start a run from a preset name or a spec file")
    p.add_argument("preset", metavar="PRESET_OR_FILE")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a spec key, e.g. --set training.max_steps=20 (repeatable)")
    p.add_argument("--name", help="name for this run (default: the preset's)")
    p.add_argument("--detach", action="store_true", help="start the run and return at once")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model.trust_remote_code: run Python code shipped with the model (only for code "
                        "you trust; a spec alone cannot switch this on)")
    p.add_argument("--print-launch", action="store_true",
                   help="start nothing: prepare a run directory and print the accelerate, torchrun and SLURM "
                        "commands that start it on one or several hosts (docs/multi-gpu.md)")
    p.add_argument("--hosts", type=int, default=1, metavar="N", help="with --print-launch: how many hosts (default 1)")
    p.add_argument("--gpus-per-host", type=int, metavar="G",
                   help="with --print-launch: GPUs on each host (default: training.gpus, or this machine's GPUs)")
    p.add_argument("--main-ip", metavar="HOST", help="with --print-launch: the address of host 0 (several hosts)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("runs", help="list runs, newest first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("tail", help="print a run's events as plain text")
    p.add_argument("run", metavar="RUN", help="run id or a unique prefix of it ('last' for the newest)")
    p.add_argument("-f", "--follow", action="store_true", help="keep following until the run ends")
    p.add_argument("--json", action="store_true", help="one JSON event per line")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("attach", help="open a run's live dashboard (replays its history, then follows it)")
    p.add_argument("run", metavar="RUN", help="run id or a unique prefix of it ('last' for the newest)")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("stop", help="stop a run gracefully (checkpoint, then cancelled)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--wait", type=float, default=120.0, metavar="SECONDS",
                   help="how long to wait for a graceful stop before signalling (default 120)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("resume", help="continue a stopped, failed or dead run from its latest checkpoint")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--detach", action="store_true")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("export", help="copy a run's adapter, or write a merged model (--merged) or a GGUF file "
                                      "with an Ollama Modelfile (--gguf TYPE)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--merged", action="store_true", help="merge the adapter into a standalone 16-bit model")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="merged weights' dtype")
    p.add_argument("--gguf", metavar="TYPE", choices=["f16", "bf16", "q8_0", "q4_k_m"],
                   help="write one GGUF file of this type (f16, bf16, q8_0; q4_k_m needs llama-cpp-python) "
                        "and an Ollama Modelfile")
    p.add_argument("--verify-limit", type=int, metavar="N",
                   help="check the export on at most N held-out prompts (default: all of them)")
    p.add_argument("--out", metavar="DIR", help="where to write (default: RUN/exports/KIND in the run directory)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("presets", help="list built-in and user presets; save a run as one, rename or delete one")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_presets)
    verbs = p.add_subparsers(dest="verb", metavar="{save,mv,rm}")
    v = verbs.add_parser("save", help="save a run's spec as a user preset: tunewiz presets save RUN NAME")
    v.add_argument("run", metavar="RUN")
    v.add_argument("name", metavar="NAME")
    v.set_defaults(func=cmd_presets_save)
    v = verbs.add_parser("mv", help="rename a user preset")
    v.add_argument("name", metavar="NAME")
    v.add_argument("new", metavar="NEW")
    v.set_defaults(func=cmd_presets_mv)
    v = verbs.add_parser("rm", help="delete a user preset")
    v.add_argument("name", metavar="NAME")
    v.set_defaults(func=cmd_presets_rm)

    p = sub.add_parser("locate", help="show where tunewiz keeps its files")
    p.add_argument("what", nargs="?", choices=["config", "state", "data", "cache", "runs", "presets"])
    p.set_defaults(func=cmd_locate)

    cli_data.add_commands(sub)  # datasets, data check
    cli_model.add_commands(sub)  # chat, eval
    cli_hw.add_commands(sub)  # doctor, recommend, models, probe
    cli_coach.add_commands(sub)  # compare, plot

    p = sub.add_parser("completion", help="print a shell completion script (bash, zsh or fish)",
                       description="Tab completion of commands, options, run ids and presets. bash: add "
                                   "'eval \"$(tunewiz completion bash)\"' to ~/.bashrc; zsh: the same with zsh in "
                                   "~/.zshrc; fish: tunewiz completion fish > ~/.config/fish/completions/tunewiz.fish")
    p.add_argument("shell", choices=completion.SHELLS)
    p.set_defaults(func=lambda args: print(completion.script(args.shell, parser), end="") or 0)
    return parser


def _open_app() -> int:
    try:
        from tunewiz.tui.app import run_app
    except ImportError:
        build_parser().print_help()
        return 0
    return run_app()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return _open_app()
    args = build_parser().parse_args(argv)
    if not getattr(args, "func", None):
        build_parser().print_help()
        return 0
    try:
        return args.func(args)
    except SpecError as exc:
        return _fail(exc.render())
    except (rundir.RunNotFound, TunewizError) as exc:
        hint = getattr(exc, "hint", None)
        return _fail(f"{exc}{f'{chr(10)}hint: {hint}' if hint else ''}")
    except BlockingIOError:
        return _fail("that run's engine is already running (another resume or train started it)")
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:  # Ctrl-C: a run started or followed keeps going (it has its own session)
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        where = Path(exc.filename).parent if exc.filename else locations.state_dir()
        return _fail(f"the disk holding {where} is full ({free_bytes(where) / 1e6:.0f} MB free): {exc.strerror}\n"
                     "hint: free some space and try again; nothing was started")


if __name__ == "__main__":
    sys.exit(main())
