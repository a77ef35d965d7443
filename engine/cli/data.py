"""`tunewiz datasets` (the dataset catalog) and `tunewiz data check` (the data checker), printed with rich.

`datasets` imports neither torch nor transformers; `data check` loads only a tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunewiz.engine.config import catalog
from tunewiz.engine.data.formats import FORMATS
from tunewiz.engine.errors import EXIT_FAILED, DataError

if TYPE_CHECKING:
    from rich.console import Console

    from tunewiz.engine.config.spec import RunSpec
    from tunewiz.engine.data.check import CheckReport

DEFAULT_MODEL = "smollm2-135m-demo"
SHOWN_PROBLEMS = 30  # problems printed in the table (--json lists up to check.LISTED_PROBLEMS)
PROGRESS_FROM_BYTES = 8 << 20  # show a progress bar for files larger than this


def add_commands(sub: Any) -> None:
    """Register `datasets` and `data check` on the top-level subparsers."""
    p = sub.add_parser("datasets", help="list the dataset presets (real hub datasets with offline samples)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_datasets)

    data = sub.add_parser("data", help="inspect training data (see `tunewiz data check -h`)")
    data.set_defaults(func=lambda _args: data.print_help() or 0)
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND")
    p = data_sub.add_parser("check", help="check a data file, hub dataset or preset: problems with line numbers, "
                                          "token lengths, truncation and trained tokens",
                            description="Exit status: 0 when no row has a problem, 1 otherwise.")
    p.add_argument("target", metavar="FILE_OR_PRESET", help="a .jsonl/.json/.csv/.parquet file, a hub id or a "
                                                             "dataset preset (`tunewiz datasets`)")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="M",
                   help=f"whose tokenizer and chat template to use: a catalog name, a hub id or a local path "
                        f"(default {DEFAULT_MODEL})")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="maximum sequence length in tokens (default: the preset's, else 2048)")
    p.add_argument("--format", choices=["auto", *FORMATS], help="row format (default: detected)")
    p.add_argument("--columns", metavar="FIELD=COLUMN,...",
                   help="map the format's fields onto your columns, e.g. instruction=question,output=answer")
    p.add_argument("--chat-template", metavar="NAME_OR_FILE", help="chatml, llama3, alpaca or a Jinja file "
                                                                   "(default: the model's own)")
    p.add_argument("--hub", action="store_true", help="for a preset: read the real data from the hub instead of "
                                                      "our offline sample")
    p.add_argument("--limit", type=int, metavar="ROWS", help="check only the first ROWS rows")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_data_check)


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def cmd_datasets(args: argparse.Namespace) -> int:
    entries = catalog.datasets().values()
    if args.json:
        print(json.dumps([{"name": e.name, "task": e.task, "description": e.description, "hub_id": e.hub_id or None,
                           "subset": e.subset, "split": e.split, "url": e.url, "license": e.license, "size": e.size,
                           "format": e.format, "columns": e.columns, "label_names": e.label_names,
                           "system_prompt": e.system_prompt, "max_seq_length": e.max_seq_length,
                           "epochs": e.epochs, "notes": e.notes, "sample": str(e.sample_path)} for e in entries],
                         indent=1))
        return 0
    from rich.table import Table
    from rich.text import Text

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for e in entries:
        where = e.hub_id + (f" ({e.subset})" if e.subset else "") if e.hub_id else "bundled"
        table.add_row(e.name, Text.assemble(e.description, "\n",
                                            (f"{e.task} · {e.license} · {e.size} · {where}", "dim")))
    console = _console()
    console.print(table)
    console.print("Check one offline: tunewiz data check NAME · train on one: dataset.preset = \"NAME\" · "
                  "details: tunewiz datasets --json", style="dim")
    return 0


def _columns(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
    if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
        raise DataError(f"--columns {text!r} is not a list of FIELD=COLUMN pairs",
                        hint="e.g. --columns instruction=question,output=answer")
    return {field.strip(): column.strip() for field, column in pairs}


def _spec(args: argparse.Namespace) -> RunSpec:
    """A run spec holding what the command line names (the data pipeline and the model resolver read specs)."""
    from tunewiz.engine.config.spec import RunSpec

    spec = RunSpec(name="data-check")
    target = args.target
    if not Path(target).expanduser().exists() and target in catalog.datasets():
        spec.dataset.preset = target
        spec.training.max_seq_length = catalog.datasets()[target].max_seq_length
    else:
        spec.dataset.source = target
    spec.dataset.format = args.format or "auto"
    spec.dataset.columns = _columns(args.columns)
    spec.dataset.chat_template = args.chat_template
    spec.training.max_seq_length = args.max_seq_len or spec.training.max_seq_length
    bundled = next((name for name, e in catalog.models().items() if e.bundled_gguf), DEFAULT_MODEL)
    spec.model.name = bundled if args.model == "demo" and "demo" not in catalog.models() else args.model
    return spec


def cmd_data_check(args: argparse.Namespace) -> int:
    from tunewiz.engine.data import check, sources
    from tunewiz.engine.data.chat import ChatEncoder, resolve_template
    from tunewiz.engine.training import models

    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise DataError("--max-seq-len must be a positive number of tokens")
    spec = _spec(args)
    source = sources.resolve(spec.dataset, offline_sample=not args.hub)
    err = _console(stderr=True)
    say = (lambda msg: err.print(msg, style="dim")) if not args.json else (lambda _msg: None)
    model_source = models.converted_folder(models.resolve(spec), on_progress=say)
    say(f"loading the tokenizer of {model_source.label}")
    tokenizer = models.load_tokenizer(model_source, spec)
    encoder = ChatEncoder(tokenizer, resolve_template(spec.dataset.chat_template, tokenizer))
    encoder.add_stop_ids(models.generation_stop_ids(model_source))
    size = Path(source.location).stat().st_size if source.kind == "file" else 0
    run = dict(model=model_source.label or spec.model.name, system_prompt=spec.dataset.system_prompt,
               limit=args.limit)
    if size >= PROGRESS_FROM_BYTES and err.is_terminal and not args.json:
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task(f"checking {source.label}", total=size)
            report = check.check(source, encoder, spec.training.max_seq_length,
                                 on_progress=lambda done, _total: bar.update(task, completed=done), **run)
    else:
        report = check.check(source, encoder, spec.training.max_seq_length, **run)
    if spec.dataset.preset:
        report.source = f"{spec.dataset.preset} ({source.label if args.hub else 'offline sample'})"
    if args.json:
        print(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
    else:
        print_report(report, _console())
    return 0 if report.ok else EXIT_FAILED


def print_report(report: CheckReport, console: Console) -> None:
    """The report for people: summary, token lengths, problems with their lines, one rendered example."""
    from rich.table import Table
    from rich.text import Text

    console.print(Text.assemble(("data check ", "bold"), (report.source, "bold cyan"),
                                f"  format {report.format} · model {report.model} · max {report.max_seq_length} "
                                f"tokens · {report.seconds:.1f} s"))
    lengths = report.token_lengths
    rows = [("rows read", f"{report.rows:,}"),
            ("trainable examples", f"{report.examples:,}"),
            ("rows training would skip", f"{report.skipped:,}"),
            ("duplicates (kept)", f"{report.problem_counts.get('duplicate', 0):,}"),
            ("token length p50 / p90 / p99 / max",
             " / ".join(f"{lengths.get(k, 0):,.0f}" for k in ("p50", "p90", "p99", "max")) if lengths else "-"),
            (f"truncated at {report.max_seq_length} tokens", f"{report.truncated:,}"),
            ("trained (supervised) tokens", f"{report.supervised_tokens:,}"
                                            + (f" ({report.supervised_tokens_cut:,} cut by truncation)"
                                               if report.supervised_tokens_cut else "")),
            ("tokens in all", f"{report.tokens:,}")]
    rows += [(f"{side} answer tokens p50 / p90 / max",
              " / ".join(f"{values.get(k, 0):,.0f}" for k in ("p50", "p90", "max")))
             for side, values in report.answer_lengths.items()]
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="dim")
    summary.add_column(justify="right")
    for name, value in rows:
        summary.add_row(name, value)
    console.print(summary)
    if report.problems:
        table = Table(title=f"problems ({sum(report.problem_counts.values()):,}: "
                            + ", ".join(f"{k} {v:,}" for k, v in report.problem_counts.items()) + ")",
                      title_justify="left", header_style="bold")
        table.add_column("LINE", justify="right", style="yellow")
        table.add_column("KIND", style="red")
        table.add_column("PROBLEM", overflow="fold")
        for problem in report.problems[:SHOWN_PROBLEMS]:
            table.add_row(str(problem.line), problem.kind, problem.message)
        console.print(table)
        hidden = sum(report.problem_counts.values()) - min(len(report.problems), SHOWN_PROBLEMS)
        if hidden:
            console.print(f"… and {hidden:,} more (--json lists the first {len(report.problems):,})", style="dim")
    if report.example:
        console.print(Text.assemble(("example ", "bold"), (report.example_where, "cyan"), " as the model sees it; ",
                                    ("trained tokens", "black on green"), " are highlighted:"))
        console.print(Text.assemble(*((s.text, "black on green" if s.trained else "") for s in report.example)))
    verdict = ("no problems found" if report.ok else
               f"{sum(report.problem_counts.values()):,} problem(s); training would skip {report.skipped:,} row(s)")
    console.print(verdict, style="bold green" if report.ok else "bold yellow")
    sys.stdout.flush()
