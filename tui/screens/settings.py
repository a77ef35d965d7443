"""Step 5: training settings, from the recommendation; a basic view and every key of the spec (ctrl+t).

Every change is validated by tunewiz.engine.config.spec as you type; a wrong value says why next to its box.
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widget import Widget
from textual.widgets import Input, Select, Static

from tunewiz.engine.config.spec import SECTIONS, RunSpec, SpecError
from tunewiz.engine.errors import TunewizError
from tunewiz.engine.planning.recommend import method_name
from tunewiz.tui import wizard
from tunewiz.tui.screens.base import WizardScreen
from tunewiz.tui.wizard import BASIC_KEYS, FIELDS, FieldInfo

FRIENDLY = {
    "name": ("Run name", "Names the run and its folder: letters, digits, '.', '_' or '-'."),
    "training.objective": ("Objective", "sft: learn from examples of the answers you want (supervised). dpo: learn "
                                     "from pairs of a better and a worse answer to the same prompt: best to change "
                                     "tone or style, or when judging answers is easier than writing them. orpo: "
                                     "like dpo without a reference model."),
    "training.epochs": ("Epochs", "How many times training reads all the data; 1 to 3 is typical."),
    "training.max_steps": ("Max steps", "Stop after this many steps instead; leave empty to use the epochs."),
    "training.learning_rate": ("Learning rate", "Size of each update. The suggested value is a good start; "
                                                "lower it if the loss jumps around."),
    "training.max_seq_length": ("Max length", "Longest example in tokens; longer ones are cut. Longer costs "
                                              "more memory."),
}


OBJECTIVE_MISMATCH = {
    True: "Your data holds preference pairs: sft learns only their chosen answers; dpo or orpo learn the preference.",
    False: "dpo and orpo learn from preference pairs (prompt, chosen, rejected), and your data has one answer per "
           "prompt: choose sft.",
}


def widget_id(key: str) -> str:
    return "f-" + key.replace(".", "--")


def key_of(widget: Widget) -> str:
    return (widget.id or "").removeprefix("f-").replace("--", ".")


class SettingsScreen(WizardScreen):
    STEP = "Settings"
    EXPLANATION = "How to train. The suggested values suit your hardware and data."
    BINDINGS: ClassVar[list[BindingType]] = [
        *WizardScreen.BINDINGS,
        Binding("ctrl+t", "toggle_advanced", "All settings", priority=True),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.working: RunSpec = self.state.spec
        self.errors: dict[str, str] = {}
        self.advanced = False

    def compose_body(self) -> ComposeResult:
        yield Static(id="settings-summary", classes="note")
        with VerticalScroll(id="settings-form"):
            section = ""
            for key in [*BASIC_KEYS, *(k for k in FIELDS if k not in BASIC_KEYS)]:
                info = FIELDS[key]
                head = key.partition(".")[0] if "." in key else ""
                if key not in BASIC_KEYS and head != section and head in SECTIONS:
                    section = head
                    yield Static(Text(f"[{head}]", style="bold"), classes="section advanced")
                yield from self._row(info)

    def _row(self, info: FieldInfo) -> ComposeResult:
        basic = info.key in BASIC_KEYS
        label, help_text = FRIENDLY.get(info.key, (info.key.rpartition(".")[2], info.doc))
        if not basic:
            label = info.key.rpartition(".")[2]
        value = wizard.get_value(self.working, info.key)
        with Horizontal(classes="field" + ("" if basic else " advanced"), id=f"row-{widget_id(info.key)}"):
            yield Static(label, classes="label")
            wid = widget_id(info.key)
            if info.kind in ("bool", "choice"):
                options = [(c, c) for c in (("true", "false") if info.kind == "bool" else info.choices)]
                value = wizard.value_text(self.working, info.key) if info.kind == "bool" else value
                if info.optional:
                    options.insert(0, ("(default)", ""))
                yield Select(options, value=value if value is not None else "", allow_blank=False, id=wid,
                             compact=True, classes="field-input")
            else:
                yield Input(wizard.value_text(self.working, info.key), id=wid, compact=True, classes="field-input",
                            placeholder="(unset)" if info.optional else "")
            yield Static(help_text, classes="help", id=f"help-{wid}")

    def on_mount(self) -> None:
        super().on_mount()
        self._show_advanced()
        self.query_one(f"#{widget_id(BASIC_KEYS[0])}").focus()

    def refresh_state(self) -> None:
        spec = self.working
        data = spec.dataset.preset or spec.dataset.source
        summary = Text.assemble(
            ("Model ", "dim"), spec.model.name, ("  method ", "dim"), method_name(spec.method),
            ("  batch ", "dim"), f"{spec.training.micro_batch_size}x{spec.training.gradient_accumulation}",
            ("  data ", "dim"), str(data))
        try:
            plan = wizard.gpu_plan(spec, self.state.report, self.state.gpus_offered)
        except TunewizError:
            plan = None  # the review step says why
        if plan is not None and plan[0] > 1:
            summary.append_text(Text.assemble(("  GPUs ", "dim"), f"{plan[0]} {spec.training.strategy.upper()}"))
        check = self.state.check_for(spec)
        found = (check.report or {}).get("format") if check is not None and check.report else None
        if (found == "preference") != (spec.training.objective != "sft") and found not in (None, "auto"):
            summary.append("\n" + OBJECTIVE_MISMATCH[spec.training.objective == "sft"], style="yellow")
        lengths = (check.report or {}).get("token_lengths") if check is not None and check.report else None
        if lengths:
            summary.append(f"\nYour examples: 90% under {lengths.get('p90', 0):,.0f} tokens, longest "
                           f"{lengths.get('max', 0):,.0f}.", style="dim")
        if not self.advanced:
            summary.append("  ctrl+t shows every setting.", style="dim")
        self.query_one("#settings-summary", Static).update(summary)

    def _show_advanced(self) -> None:
        for widget in self.query(".advanced"):
            widget.display = self.advanced
        self.refresh_state()

    def action_toggle_advanced(self) -> None:
        self.advanced = not self.advanced
        self._show_advanced()

    # ------------------------------------------------------------ validation as you type

    def _set(self, key: str, text: str) -> None:
        help_widget = self.query_one(f"#help-{widget_id(key)}", Static)
        row = self.query_one(f"#row-{widget_id(key)}")
        try:
            self.working = wizard.set_value(self.working, key, text)
        except SpecError as exc:
            self.errors[key] = wizard.problem_text(exc, key)
            help_widget.update(Text(self.errors[key], style="bold red"))
            row.add_class("invalid")
            return
        self.errors.pop(key, None)
        row.remove_class("invalid")
        help_widget.update(FRIENDLY.get(key, ("", FIELDS[key].doc))[1] if key in BASIC_KEYS else FIELDS[key].doc)
        self.refresh_state()

    @on(Input.Changed, ".field-input")
    def _input_changed(self, event: Input.Changed) -> None:
        key = key_of(event.input)
        if wizard.value_text(self.working, key) != event.value or key in self.errors:
            self._set(key, event.value)

    @on(Input.Submitted, ".field-input")
    def _input_submitted(self) -> None:
        self.action_next()

    @on(Select.Changed, ".field-input")
    def _select_changed(self, event: Select.Changed) -> None:
        key = key_of(event.select)
        value = event.value if isinstance(event.value, str) else ""
        if wizard.value_text(self.working, key) != value:
            self._set(key, value)

    def action_next(self) -> None:
        if self.errors:
            key = next(iter(self.errors))
            if key not in BASIC_KEYS and not self.advanced:
                self.action_toggle_advanced()
            self.query_one(f"#{widget_id(key)}").focus()
            self.notify(f"Fix {key} first: {self.errors[key]}", severity="error")
            return
        self.state.spec = self.working
        self.tw.go_next(self)
