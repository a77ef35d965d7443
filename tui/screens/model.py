"""Step 3: the recommender's ranked models and methods, each with a memory bar; or any model typed in."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.console import Group
from rich.padding import Padding
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from tunewiz.engine.config import catalog
from tunewiz.engine.config.spec import SpecError
from tunewiz.engine.planning.recommend import method_name
from tunewiz.tui import wizard
from tunewiz.tui.screens.base import WizardScreen
from tunewiz.tui.widgets.memory import estimate_total, fit_text, memory_bar, verdict

METHODS = (
    "LoRA trains a small add-on (an adapter) on the model's 16-bit weights; QLoRA trains it on a 4-bit copy: "
    "a quarter of the weight memory, a little slower, NVIDIA GPUs only. Batch 2x8: 2 sequences per step, "
    "gradients added up over 8 steps."
)


def choice_id(choice: Any) -> str:
    return f"{choice.model}|{choice.method}|{getattr(choice, 'gpus', 1)}"


def gpus_text(choice: Any) -> str:
    """'2 GPUs DDP' for a choice that trains on several GPUs, else ''."""
    gpus = getattr(choice, "gpus", 1)
    return f"{gpus} GPUs {choice.strategy.upper()}" if gpus > 1 else ""


def gpu_note(state: Any) -> Text | None:
    """What the model step's `g` switches between, on a machine with several GPUs alike."""
    offered = state.gpus_offered
    if offered < 2 or state.recommendation_one is None:
        return None
    if state.one_gpu:
        return Text.assemble(("Training on 1 GPU", "bold"), f" of {offered} alike. g: use all {offered} (faster, "
                                                            "or bigger models).")
    return Text.assemble((f"Training on all {offered} GPUs", "bold"), ": DDP when a model fits one, else FSDP. "
                                                                      "g: use 1 GPU.")


def qlora_problem(choice: Any, report: Any) -> str | None:
    """Why QLoRA cannot run here, when the hardware report says so."""
    if choice.method != "qlora" or report is None:
        return None
    if not report.has_gpu:
        return "QLoRA needs an NVIDIA GPU, and none was found."
    if report.libraries_checked and not report.bitsandbytes:
        return "QLoRA needs bitsandbytes, which is not installed (pip install bitsandbytes)."
    return None


def choice_prompt(choice: Any, rank: int, report: Any = None) -> Group:
    """Three lines: model and method with the verdict, the memory bar, and the reason in plain words."""
    available, fit, where = verdict(choice, report)
    head = Text.assemble((f"{rank}. ", "bold"), (choice.model, "bold"), "  ", (method_name(choice.method), "bold cyan"),
                         "  ", fit_text(fit))
    head.append(f"  batch {choice.micro_batch_size}x{choice.gradient_accumulation}", style="dim")
    if gpus_text(choice):
        head.append(f"  {gpus_text(choice)}", style="bold magenta")
    bar = memory_bar(estimate_total(choice, report), available, fit, where=where)
    lines: list[Any] = [head, Padding(bar, (0, 0, 0, 3)), Padding(Text(choice.reason, style="dim"), (0, 0, 0, 3))]
    entry = catalog.models().get(choice.model)
    if entry is not None and entry.source_note():
        lines.append(Padding(Text(entry.source_note(), style="dim italic"), (0, 0, 0, 3)))
    problem = qlora_problem(choice, report)
    if problem:
        lines.append(Padding(Text(f"! {problem}", style="bold yellow"), (0, 0, 0, 3)))
    return Group(*lines)


class ModelScreen(WizardScreen):
    STEP = "Model"
    MAIN = "#choices"
    EXPLANATION = "Pick a model and method, best first. Bars: memory needed of free."
    BINDINGS: ClassVar[list[BindingType]] = [
        *WizardScreen.BINDINGS,
        Binding("o", "other", "Other model"),
        Binding("g", "gpus", "All GPUs / 1 GPU"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._shown: list[Any] = []
        """The choices the list shows, in its order."""

    def compose_body(self) -> ComposeResult:
        yield Static(METHODS, classes="note", id="methods")
        yield Static(id="gpu-note", classes="note")
        yield OptionList(id="choices")
        with Horizontal(classes="row"):
            yield Static("Other model:", classes="label")
            yield Input(placeholder="org/name or a folder; Enter estimates it", id="other",
                        compact=True)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#choices", OptionList).focus()

    def refresh_state(self) -> None:
        note = gpu_note(self.state)
        note_widget = self.query_one("#gpu-note", Static)
        if note_widget.display != (note is not None):
            note_widget.display = note is not None
            self.refresh_bindings()  # offers `g` or not
        if note is not None:
            note_widget.update(note)
        options = self.query_one("#choices", OptionList)
        choices = self.state.choices
        ids = [choice_id(c) for c in choices]
        current = [choice_id(c) for c in self._shown]
        if ids == current and choices:
            return
        if not choices:
            message = self.state.recommend_error or "Waiting for the hardware check..."
            self._shown = []
            options.clear_options()
            options.add_option(Option(Text(message, style="dim"), id="none", disabled=True))
            return
        keep = self._highlighted_choice() or self.state.choice  # the same model after the GPU switch
        shown_models = {c.model for c in self._shown}
        options.clear_options()
        options.add_options(Option(choice_prompt(c, rank, self.state.report), id=choice_id(c))
                            for rank, c in enumerate(choices, 1))
        self._shown = choices
        extra = self.state.extra_choices_one if self.state.one_gpu else self.state.extra_choices
        typed = [i for i, c in enumerate(choices) if c.model not in shown_models and c in extra]
        same = [i for i, c in enumerate(choices) if keep is not None and c.model == keep.model]
        exact = [i for i in same if choices[i].method == keep.method]
        if typed:
            options.highlighted = typed[0]
            options.focus()
        else:
            options.highlighted = (exact or same or [0])[0]

    def _highlighted_choice(self) -> Any:
        index = self.query_one("#choices", OptionList).highlighted
        return self._shown[index] if index is not None and index < len(self._shown) else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "gpus":
            return gpu_note(self.state) is not None
        return True

    def action_gpus(self) -> None:
        if gpu_note(self.state) is not None:
            self.tw.toggle_gpus()

    @on(OptionList.OptionSelected, "#choices")
    def _selected(self) -> None:
        self.action_next()

    @on(Input.Submitted, "#other")
    def _other_submitted(self, event: Input.Submitted) -> None:
        name = event.value.strip()
        if not name:
            return
        if self.state.report is None:
            self.notify("Still checking the hardware; try again in a moment.")
            return
        self.notify(f"Estimating {name}...")
        self.tw.estimate_model(name)

    def action_other(self) -> None:
        self.query_one("#other", Input).focus()

    def action_next(self) -> None:
        choice = self._highlighted_choice()
        if choice is None:
            self.notify("No model to pick yet: wait for the hardware check, or type one under Other model.")
            return
        problem = qlora_problem(choice, self.state.report)
        if problem or verdict(choice, self.state.report)[1] == "too_big":
            from tunewiz.tui.dialogs import ConfirmDialog

            def answered(yes: bool | None) -> None:
                if yes:
                    self._pick(choice)

            if problem:
                title, message = "This cannot run here yet", f"{problem}\n\nThe run would stop at once. Pick it anyway?"
            else:
                title = "This probably does not fit"
                message = (f"{choice.reason}\n\nTraining would most likely stop with an out-of-memory error. "
                           "Pick it anyway?")
            self.app.push_screen(ConfirmDialog(title, message, yes="Pick it anyway", no="Choose another"), answered)
            return
        self._pick(choice)

    def _pick(self, choice: Any) -> None:
        try:
            spec = wizard.apply_choice(self.state.spec, choice, self.tw.base)
        except SpecError as exc:
            self.tw.show_error("That choice gives an invalid spec", exc)
            return
        self.state.choice = choice
        self.state.spec = spec
        self.tw.go_next(self)
