"""Step 6: the run spec as TOML, the memory estimate, the data check, where outputs go; save or launch."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.console import Group
from rich.padding import Padding
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Static

from tunewiz.engine import hints
from tunewiz.engine.config import presets
from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.config.spec import RunSpec, SpecError
from tunewiz.engine.errors import TunewizError
from tunewiz.engine.planning.recommend import method_name
from tunewiz.engine.render import memory as gb
from tunewiz.tui import wizard
from tunewiz.tui.screens.base import WizardScreen
from tunewiz.tui.services import ServiceError
from tunewiz.tui.widgets.memory import estimate_breakdown, estimate_total, fit_text, memory_bar, verdict


def longest_example(state: wizard.WizardState, spec: RunSpec) -> int | None:
    """The data's longest example in tokens, as the data check measured it (None until it has)."""
    result = state.check_for(spec)
    lengths = (result.report or {}).get("token_lengths") if result is not None else None
    longest = (lengths or {}).get("max")
    return int(longest) if isinstance(longest, (int, float)) and longest > 0 else None


def better_choice(state: wizard.WizardState, spec: RunSpec, ranked: list[Any]) -> Any:
    """The recommender's first choice at the data's measured length, when it is another model or method than the
    spec's and the spec's model came from the recommender (a typed-in model is the user's own call)."""
    picked = state.choice
    if picked is None or picked in state.extra_choices or picked in state.extra_choices_one or not ranked:
        return None
    first = ranked[0]
    if first.fit != "fits" or (first.model, first.method) == (spec.model.name, spec.method):
        return None
    return first


def gpu_lines(state: wizard.WizardState, spec: RunSpec) -> list[Any]:
    """'GPUs: 2 × H100 (GPUs 0, 1) · DDP: ...' and the effective batch line; nothing on one GPU or the CPU."""
    try:
        plan = wizard.gpu_plan(spec, state.report, state.gpus_offered)
    except TunewizError as exc:
        return [Text.assemble(("GPUs: ", "bold"), (str(exc), "bold red"))]
    if plan is None:
        return []
    _count, text, batch = plan
    return [Text.assemble(("GPUs: ", "bold"), text), Padding(Text(batch, style="dim"), (0, 0, 0, 6))]


def check_line(state: wizard.WizardState, spec: RunSpec) -> Text:
    result = state.check_for(spec)
    if result is None:
        return Text("not checked yet", style="dim")
    if result.error:
        return Text(f"the check failed: {result.error}", style="red")
    if result.report is None:
        return Text("checking...", style="yellow")
    r = result.report
    text = Text(f"{r.get('examples', 0):,} usable examples of {r.get('rows', 0):,} read")
    if r.get("skipped"):
        text.append(f", {r['skipped']:,} skipped", style="yellow")
    if r.get("truncated"):
        text.append(f", {r['truncated']:,} cut at {r.get('max_seq_length')} tokens", style="yellow")
    if not r.get("examples"):
        text.append(" (training would stop at once)", style="bold red")
    return text


class ReviewScreen(WizardScreen):
    STEP = "Review"
    EXPLANATION = "Check what will run. Launch trains in the background; quitting won't stop it."
    BINDINGS: ClassVar[list[BindingType]] = [
        *WizardScreen.BINDINGS,
        Binding("l", "launch", "Launch"),
        Binding("s", "save", "Save as preset"),
        Binding("r", "rerank", "Use the advice"),
    ]

    def compose_body(self) -> ComposeResult:
        yield Static(id="review-summary")
        with VerticalScroll(id="review-toml"):
            yield Static(id="toml")
        with Horizontal(classes="buttons"):
            yield Button("Launch (l)", id="launch", variant="primary", compact=True)
            yield Button("Save as preset (s)", id="save", compact=True)
            yield Button("Back (esc)", id="back", compact=True)

    def __init__(self) -> None:
        super().__init__()
        self._estimated_for: tuple[str, int | None] | None = None
        """The spec (as TOML) and data length the estimate was asked for: a new one when either changes."""
        self._better: Any = None
        """The recommender's first choice at the data's measured length, when it differs from the spec's."""

    def on_mount(self) -> None:
        super().on_mount()
        self.state.review_estimate = None
        self.tw.request_data_check(self.state.check_request(self.state.spec))
        self.query_one("#launch", Button).focus()

    def _estimate(self, spec: RunSpec) -> None:
        """Ask for the estimate of exactly this spec (again when the data's measured length comes in), and
        re-rank at that length."""
        report = self.state.report
        longest = longest_example(self.state, spec)
        key = (spec_mod.dumps(spec), longest)
        if report is None or key == self._estimated_for:
            return
        self._estimated_for = key
        self.tw.estimate_review(spec, longest)
        self._better = None
        if longest is not None and report.has_gpu:
            length = min(spec.training.max_seq_length, longest)
            try:
                ranked = self.tw.services.recommend(report, length, gpus=1 if self.state.one_gpu else None).choices
            except (TunewizError, ServiceError):
                ranked = []
            self._better = better_choice(self.state, spec, ranked)
        self.refresh_bindings()

    def refresh_state(self) -> None:
        spec = self.state.spec
        self._estimate(spec)
        runs = self.tw.services.runs_dir()
        choice = self.state.review_estimate
        lines: list[Any] = [Text.assemble(
            ("Run ", "dim"), (spec.name, "bold"), ("  model ", "dim"), spec.model.name, ("  method ", "dim"),
            method_name(spec.method), ("  data ", "dim"), str(spec.dataset.preset or spec.dataset.source))]
        if choice is not None:
            available, fit, where = verdict(choice, self.state.report)
            memory = Text("Memory: ", style="bold")
            memory.append_text(fit_text(fit))
            memory.append(" ")
            needed = estimate_total(choice, self.state.report)
            memory.append_text(memory_bar(needed, available, fit, width=16, where=where))
            lines.append(memory)
            detail = estimate_breakdown(choice, self.state.report)
            if detail:
                lines.append(Padding(Text(detail, style="dim"), (0, 0, 0, 8)))
            longest = longest_example(self.state, spec)
            if longest is not None and longest < spec.training.max_seq_length and not spec.training.packing:
                lines.append(Padding(Text(f"(for the data's longest example, {longest} tokens)", style="dim"),
                                     (0, 0, 0, 8)))
        else:
            lines.append(Text.assemble(("Memory: ", "bold"), ("estimating..." if self.state.report is not None
                                                              else "no estimate", "dim")))
        if self._better is not None:
            better = self._better
            lines.append(Text.assemble(
                ("Advice: ", "bold"), f"with this data the first choice is {better.model} with "
                f"{method_name(better.method)} ({gb(estimate_total(better, self.state.report))}). ", ("r", "bold"),
                ": switch to it."))
        lines += gpu_lines(self.state, spec)
        lines.append(Text.assemble(("Data: ", "bold"), check_line(self.state, spec)))
        where = (f"adapter in {spec.output_dir}; logs in {runs}/<run id>/" if spec.output_dir else
                 f"{runs}/<run id>/ (the adapter goes in its output/ folder)")
        lines.append(Text.assemble(("Outputs: ", "bold"), where))
        report = self.state.report
        if spec.method == "qlora" and report is not None and not report.has_gpu:
            lines.append(Text("QLoRA needs an NVIDIA GPU and none was found: this run would fail. Go back and "
                              "pick LoRA.", style="bold red"))
        elif report is not None and not report.has_gpu and spec.model.name != self.tw.base.model.name:
            lines.append(Text(f"No GPU: {spec.model.name} would train on the CPU, which takes hours to days "
                              f"(the demo model takes minutes).", style="bold yellow"))
        self.query_one("#review-summary", Static).update(Group(*lines))
        self.query_one("#toml", Static).update(Text(spec_mod.dumps(spec)))

    @on(Button.Pressed, "#launch")
    def action_launch(self) -> None:
        try:
            spec = wizard.validated(self.state.spec)
        except SpecError as exc:
            self.tw.show_error("The run spec is not valid", exc)
            return
        if spec.model.trust_remote_code:
            self._ask_remote_code(spec)
            return
        self.query_one("#launch", Button).disabled = True
        self.tw.launch_run(spec)

    def _ask_remote_code(self, spec: RunSpec) -> None:
        """Running code shipped with a model is the user's explicit choice, never the spec's alone."""
        from tunewiz.tui.dialogs import ConfirmDialog

        def answered(yes: bool | None) -> None:
            if yes:
                self.query_one("#launch", Button).disabled = True
                self.tw.launch_run(spec, trust_remote_code=True)

        self.app.push_screen(ConfirmDialog(
            "Run the model's own code?",
            f"model.trust_remote_code is on: loading {spec.model.name} runs Python code from its folder or hub "
            "repository, with your permissions. Only say yes for code you trust. The run card records the choice.",
            yes="Run its code", no="Cancel"), answered)

    def action_next(self) -> None:
        self.action_launch()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return self._better is not None if action == "rerank" else True

    def action_rerank(self) -> None:
        """Switch to the recommender's first choice at this data's length, keeping the data and its length."""
        better = self._better
        if better is None:
            return
        spec = self.state.spec
        try:
            new = wizard.apply_choice(spec, better, self.tw.base)
            new = wizard.apply_dataset(new, self.state.dataset, self.tw.base, better)
            new = wizard.set_value(new, "training.max_seq_length", str(spec.training.max_seq_length))
        except SpecError as exc:
            self.tw.show_error("That choice gives an invalid spec", exc)
            return
        self.state.choice, self.state.spec, self._better = better, new, None
        self.refresh_bindings()
        self.notify(f"Now {better.model} with {method_name(better.method)}.")
        self.refresh_state()

    @on(Button.Pressed, "#back")
    def _back_pressed(self) -> None:
        self.action_back()

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        from tunewiz.tui.dialogs import NameDialog

        spec = self.state.spec
        self.app.push_screen(NameDialog(
            "Save as a preset",
            f"A preset relaunches this exact run later: from the Welcome screen, or with "
            f"`{hints.command('train NAME')}`. "
            "Name it (letters, digits, '.', '_' or '-'):", value=presets.free_name(spec.name)), self._save_named)

    def _save_named(self, name: str | None, overwrite: bool = False) -> None:
        from tunewiz.tui.dialogs import ConfirmDialog

        if not name:
            return
        try:
            path = presets.save_user_preset(self.state.spec, name, overwrite=overwrite)
        except SpecError as exc:
            if "exists already" in exc.render() and not overwrite:
                self.app.push_screen(
                    ConfirmDialog("Replace the preset?", f"You already saved a preset called {name!r}. Replace it?",
                                  yes="Replace", no="Keep the old one"),
                    lambda yes: self._save_named(name, overwrite=True) if yes else None)
                return
            self.tw.show_error("Could not save the preset", exc)
            return
        except OSError as exc:
            self.tw.show_error("Could not save the preset", exc)
            return
        self.notify(f"Saved as {path.name} in {path.parent}\n\nRelaunch it with:\n{hints.command(f'train {name}')}",
                    title="Preset saved", timeout=8)

    def on_screen_resume(self) -> None:
        self.query_one("#launch", Button).disabled = False
