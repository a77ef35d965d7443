"""Step 4: the dataset presets or your own data, with the checker's findings and a rendered example."""

from __future__ import annotations

from typing import Any, ClassVar, cast

from rich.console import Group
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.timer import Timer
from textual.widgets import Input, OptionList, Select, Static
from textual.widgets.option_list import Option

from tunewiz.engine.config import catalog
from tunewiz.engine.config.spec import RunSpec, SpecError
from tunewiz.engine.data.formats import FORMATS, DataFormat
from tunewiz.tui import wizard
from tunewiz.tui.datafile import Peek, fields_of, format_fields_text, guess_mapping, peek
from tunewiz.tui.messages import DataFilePeeked
from tunewiz.tui.screens.base import WizardScreen
from tunewiz.tui.wizard import CUSTOM, CheckResult, DatasetSelection

CHECK_DELAY_S = 0.5
PREVIEW_CHARS = 1500
SHOWN_PROBLEMS = 5
MAPPED_FIELDS = ("messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text",
                 "system")
TRAINED_STYLE = "bold black on green"


def about_preset(name: str) -> Group:
    entry = catalog.datasets()[name]
    where = "bundled with tunewiz" if entry.bundled else f"{entry.hub_id} on the Hugging Face hub"
    parts: list[Any] = [
        Text(entry.description, style="bold"),
        Text.assemble(("task ", "dim"), entry.task, ("  licence ", "dim"), entry.license),
        Text.assemble(("size ", "dim"), entry.size, ("  format ", "dim"), entry.format),
        Text.assemble(("from ", "dim"), where),
    ]
    if entry.notes:
        parts.append(Text(entry.notes, style="italic"))
    if not entry.bundled:
        parts.append(Text("The check and preview read tunewiz's offline sample, in the same columns.", style="dim"))
    return Group(*parts)


def check_renderable(result: CheckResult | None, limit: int | None, custom: bool = False) -> Group:
    """The checker's findings: counts, token lengths, truncation, the first problems, one rendered example."""
    if result is None:
        return Group(Text("Type the file's path (or a hub id) and press Enter to check it." if custom else
                          "The data check starts when you stay on a dataset for a moment.", style="dim"))
    if result.report is None and result.error is None:
        return Group(Text(f"Checking the data with {result.request.model}'s tokenizer... The first check "
                          "loads the tokenizer (and converts the bundled demo model once): a minute or two on a "
                          "small machine. You may go on meanwhile.", style="yellow"))
    if result.error is not None:
        parts: list[Any] = [Text.assemble(("The check failed: ", "bold red"), result.error)]
        if result.hint:
            parts.append(Text.assemble(("What to do: ", "bold"), result.hint))
        return Group(*parts)
    r = result.report or {}
    lengths = r.get("token_lengths") or {}
    rows, examples, skipped = r.get("rows", 0), r.get("examples", 0), r.get("skipped", 0)
    capped = " (the first rows only)" if limit and rows >= limit else ""
    verdict = ("bold green", "No problems found.") if r.get("ok") else ("bold yellow", f"{skipped:,} row(s) would "
                                                                                     "be skipped.")
    parts = [
        Text.assemble(("Check: ", "bold"), f"{rows:,} rows read{capped}, {examples:,} usable, format ",
                      (str(r.get("format")), "bold"), ". ", (verdict[1], verdict[0])),
    ]
    if lengths:
        parts.append(Text(f"Tokens per example: half under {lengths.get('p50', 0):,.0f}, 90% under "
                          f"{lengths.get('p90', 0):,.0f}, longest {lengths.get('max', 0):,.0f}. "
                          f"Cut at {r.get('max_seq_length')}: {r.get('truncated', 0):,} example(s)."))
    for problem in (r.get("problems") or [])[:SHOWN_PROBLEMS]:
        parts.append(Text.assemble(("  line ", "dim"), (str(problem.get("line")), "yellow"), " ",
                                   (str(problem.get("kind")), "red"), " ", str(problem.get("message"))))
    hidden = sum((r.get("problem_counts") or {}).values()) - min(len(r.get("problems") or []), SHOWN_PROBLEMS)
    if hidden > 0:
        parts.append(Text(f"  ... and {hidden:,} more (tunewiz data check lists them all)", style="dim"))
    example = r.get("example") or []
    if example:
        parts.append(Text.assemble(("Preview ", "bold"), (str(r.get("example_where", "")), "dim"),
                                   " as the model sees it; ", ("trained tokens", TRAINED_STYLE), " highlighted "
                                   "(Tab moves here; arrows scroll):"))
        preview = Text()
        shown = 0
        for segment in example:
            text = str(segment.get("text", ""))[: max(0, PREVIEW_CHARS - shown)]
            shown += len(text)
            preview.append(text, style=TRAINED_STYLE if segment.get("trained") else "")
        if shown >= PREVIEW_CHARS:
            preview.append(" ...", style="dim")
        parts.append(preview)
    return Group(*parts)


class DatasetScreen(WizardScreen):
    STEP = "Data"
    MAIN = "#datasets"
    EXPLANATION = "Pick what the model learns from: a ready-made dataset or your own data."
    BINDINGS: ClassVar[list[BindingType]] = [
        *WizardScreen.BINDINGS,
        Binding("c", "recheck", "Check again"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._timer: Timer | None = None
        self._peek = Peek()

    def compose_body(self) -> ComposeResult:
        names = list(catalog.datasets())
        with Horizontal(id="data-split"):
            options = [Option(name, id=name) for name in names]
            options.append(Option(Text("Your own data...", style="bold"), id=CUSTOM))
            yield OptionList(*options, id="datasets")
            with VerticalScroll(id="data-detail"):
                yield Static(id="data-about")
                with Vertical(id="custom"):
                    with Horizontal(classes="row"):
                        yield Static("File or hub id:", classes="label")
                        yield Input(self.state.dataset.source or "", id="source", compact=True,
                                    placeholder="~/data/train.jsonl or org/name; Enter checks it")
                    with Horizontal(classes="row"):
                        yield Static("Format:", classes="label")
                        yield Select([("detect it (auto)", "auto"), *((f, f) for f in FORMATS)], id="format",
                                     value=self.state.dataset.format, allow_blank=False, compact=True)
                    yield Static(id="columns-found", classes="note")
                    columns = dict(self.state.dataset.columns)
                    for name in MAPPED_FIELDS:
                        with Horizontal(classes="row mapping", id=f"map-{name}"):
                            yield Static(f"{name}:", classes="label")
                            yield Input(columns.get(name, ""), id=f"col-{name}", compact=True,
                                        placeholder=f"column '{name}'")
                yield Static(id="data-check")

    def on_mount(self) -> None:
        super().on_mount()
        options = self.query_one("#datasets", OptionList)
        selected = self.state.dataset
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        options.highlighted = ids.index(selected.preset) if selected.preset in ids else len(ids) - 1
        options.focus()

    # ------------------------------------------------------------ what is selected

    def _highlighted_id(self) -> str | None:
        options = self.query_one("#datasets", OptionList)
        if options.highlighted is None:
            return None
        return options.get_option_at_index(options.highlighted).id

    def _columns(self) -> tuple[tuple[str, str], ...]:
        fmt = self._format()
        pairs = []
        for name in fields_of(fmt) if fmt != "auto" else MAPPED_FIELDS:
            value = self.query_one(f"#col-{name}", Input).value.strip()
            if value and value != name:
                pairs.append((name, value))
        return tuple(sorted(pairs))

    def _format(self) -> DataFormat:
        value = self.query_one("#format", Select).value  # its options are the formats' names
        return cast(DataFormat, value) if isinstance(value, str) else "auto"

    def selection(self) -> DatasetSelection | None:
        highlighted = self._highlighted_id()
        if highlighted is None:
            return None
        if highlighted != CUSTOM:
            return DatasetSelection(preset=highlighted)
        source = self.query_one("#source", Input).value.strip()
        if not source:
            return None
        return DatasetSelection(source=source, format=self._format(), columns=self._columns())

    def candidate_spec(self) -> RunSpec | None:
        selection = self.selection()
        if selection is None:
            return None
        try:
            return wizard.apply_dataset(self.state.spec, selection, self.tw.base, self.state.choice)
        except SpecError:
            return None

    # ------------------------------------------------------------ showing it

    def refresh_state(self) -> None:
        highlighted = self._highlighted_id()
        custom = highlighted == CUSTOM
        self.query_one("#custom").display = custom
        about = self.query_one("#data-about", Static)
        if custom:
            about.update(Group(
                Text("Your own examples: a .jsonl, .json, .csv or .parquet file, or a dataset id on the Hugging "
                     "Face hub. If its columns have other names than the format's fields, pick the format and type "
                     "which column holds each field."),
                Text(format_fields_text(), style="dim")))
            self._show_mapping()
        elif highlighted:
            about.update(about_preset(highlighted))
        spec = self.candidate_spec()
        result = self.state.check_for(spec) if spec is not None else None
        if custom and spec is None:
            result = None
        self.query_one("#data-check", Static).update(check_renderable(result, wizard.CHECK_ROW_LIMIT, custom))

    def _show_mapping(self) -> None:
        fmt = self._format()
        report_format = None
        spec = self.candidate_spec()
        result = self.state.check_for(spec) if spec is not None else None
        if result is not None and result.report:
            report_format = result.report.get("format")
        shown_format = fmt if fmt != "auto" else (report_format or self._peek.detected)
        wanted = set(fields_of(shown_format)) if shown_format else set()
        for name in MAPPED_FIELDS:
            self.query_one(f"#map-{name}").display = name in wanted
        found = self.query_one("#columns-found", Static)
        if self._peek.error:
            found.update(Text(self._peek.error, style="red"))
        elif self._peek.columns:
            if fmt != "auto":
                detected = ""
            elif self._peek.detected:
                detected = f"; they look like {self._peek.detected}"
            else:
                detected = "; no format known: pick one and say which column holds each field"
            found.update(Text(f"Columns in the file: {', '.join(self._peek.columns)}{detected}"))
        else:
            found.update("")

    # ------------------------------------------------------------ checking

    def _schedule_check(self, delay: float = CHECK_DELAY_S) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if delay <= 0:
            self._start_check()
        else:
            self._timer = self.set_timer(delay, self._start_check)

    def _start_check(self) -> None:
        spec = self.candidate_spec()
        if spec is not None:
            self.tw.request_data_check(self.state.check_request(spec))

    def action_recheck(self) -> None:
        spec = self.candidate_spec()
        if spec is not None:
            self.state.checks.pop(self.state.check_request(spec), None)
            self._start_check()

    @work(thread=True, exclusive=True, group="peek", exit_on_error=False)
    def peek_source(self, source: str, columns: dict[str, str]) -> None:
        self.post_message(DataFilePeeked(source, peek(source, columns)))

    @on(OptionList.OptionHighlighted, "#datasets")
    def _highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self.refresh_state()
        if event.option.id != CUSTOM:
            self._schedule_check()
        elif self._timer is not None:
            self._timer.stop()

    @on(OptionList.OptionSelected, "#datasets")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id == CUSTOM:
            self.query_one("#source", Input).focus()
            return
        self.action_next()

    @on(Input.Submitted, "#source")
    def _source_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.peek_source(event.value.strip(), dict(self._columns()))
            self._schedule_check(0)

    @on(Input.Changed, "#source")
    def _source_changed(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._peek = Peek()
        self.refresh_state()

    @on(Input.Changed, ".mapping Input")
    @on(Select.Changed, "#format")
    def _mapping_changed(self) -> None:
        self.refresh_state()
        if self.query_one("#source", Input).value.strip():
            self._schedule_check(1.0)

    @on(DataFilePeeked)
    def _peeked(self, message: DataFilePeeked) -> None:
        if message.source != self.query_one("#source", Input).value.strip():
            return
        self._peek = message.peek
        guess = guess_mapping(message.peek.columns) if message.peek.columns and not message.peek.detected else None
        if guess and self._format() == "auto" and not self._columns():
            self.query_one("#format", Select).value = "alpaca"
            for field_name, column in guess.items():
                self.query_one(f"#col-{field_name}", Input).value = column
            self.notify(f"Guessed the columns: {guess['instruction']} is the instruction, {guess['output']} the "
                        "answer. Change them below if that is wrong.", timeout=8)
        self.refresh_state()

    # ------------------------------------------------------------ moving on

    def action_next(self) -> None:
        selection = self.selection()
        if selection is None:
            self.notify("Type the path of your data file (or a hub id) first.", severity="warning")
            self.query_one("#source", Input).focus()
            return
        try:
            spec = wizard.apply_dataset(self.state.spec, selection, self.tw.base, self.state.choice)
        except SpecError as exc:
            self.tw.show_error("That data cannot be used", exc)
            return
        self.tw.request_data_check(self.state.check_request(spec))
        result = self.state.check_for(spec)
        report = result.report if result is not None else None
        if result is not None and result.error and result.error != "cancelled":
            problem = f"The data check failed: {result.error}"
        elif report is not None and not report.get("examples"):
            problem = "The data check found no usable example: training would stop at once."
        else:
            problem = None
        if problem:
            from tunewiz.tui.dialogs import ConfirmDialog

            def answered(yes: bool | None) -> None:
                if yes:
                    self._go(selection, spec)

            self.app.push_screen(ConfirmDialog("This data has a problem", f"{problem}\n\nGo on anyway?",
                                               yes="Go on", no="Stay here"), answered)
            return
        self._go(selection, spec)

    def _go(self, selection: DatasetSelection, spec: RunSpec) -> None:
        self.state.dataset = selection
        self.state.spec = spec
        self.tw.go_next(self)

