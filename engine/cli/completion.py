"""`tunewiz completion bash|zsh|fish`: a shell completion script, written from the command's own parser so
that it never falls behind it. Commands and their options complete from the parser; a RUN completes
from the runs folder (and `last`), a PRESET from `tunewiz presets`, asked when Tab is pressed."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass

SHELLS = ("bash", "zsh", "fish")
RUNS = 'last $(command ls "$(tunewiz locate runs 2>/dev/null)" 2>/dev/null)'
PRESETS = "$(tunewiz presets 2>/dev/null | cut -d' ' -f1)"
FISH_RUNS = "(echo last; command ls (tunewiz locate runs 2>/dev/null) 2>/dev/null)"
FISH_PRESETS = "(tunewiz presets 2>/dev/null | cut -d' ' -f1)"


@dataclass(frozen=True)
class Command:
    name: str
    options: tuple[str, ...]
    words: tuple[str, ...]  # fixed words its first argument takes (verbs, choices)
    takes: str | None  # "run" or "preset": what its first argument names


def commands(parser: argparse.ArgumentParser) -> list[Command]:
    """The subcommands of `parser`, with what each one's arguments are."""
    found = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for name, sub in action.choices.items():
            options = tuple(o for a in sub._actions for o in a.option_strings if o.startswith("--"))
            positionals = [a for a in sub._actions if not a.option_strings]
            words: tuple[str, ...] = ()
            takes = None
            if positionals:
                first = positionals[0]
                if isinstance(first, argparse._SubParsersAction):
                    words = tuple(first.choices)
                elif first.choices:
                    words = tuple(str(c) for c in first.choices)
                elif first.dest in ("run", "preset"):
                    takes = first.dest
            found.append(Command(name, options, words, takes))
    return found


def _bash(cmds: list[Command]) -> str:
    cases = []
    for c in cmds:
        source = {"run": RUNS, "preset": PRESETS}.get(c.takes or "", " ".join(c.words))
        cases.append(f"        {c.name}) opts={shlex.quote(' '.join(c.options))}; args=\"{source}\" ;;")
    names = " ".join(c.name for c in cmds)
    return "\n".join([
        "# tunewiz completion for bash: add to ~/.bashrc:  eval \"$(tunewiz completion bash)\"",
        "_tunewiz() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" opts="" args=""',
        "    if [ \"$COMP_CWORD\" -eq 1 ]; then",
        f'        COMPREPLY=($(compgen -W "{names} --help --version" -- "$cur")); return',
        "    fi",
        '    case "${COMP_WORDS[1]}" in',
        *cases,
        "    esac",
        '    if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "$opts" -- "$cur"));',
        '    elif [ "$COMP_CWORD" -eq 2 ]; then COMPREPLY=($(compgen -W "$args" -- "$cur")); fi',
        "}",
        "complete -o default -F _tunewiz tunewiz",
        "",
    ])


def _zsh(cmds: list[Command]) -> str:
    return ("# tunewiz completion for zsh: add to ~/.zshrc:  eval \"$(tunewiz completion zsh)\"\n"
            "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n"
            + _bash(cmds).split("\n", 1)[1])


def _fish(cmds: list[Command]) -> str:
    lines = ["# tunewiz completion for fish: tunewiz completion fish > ~/.config/fish/completions/tunewiz.fish",
             "complete -c tunewiz -f"]
    names = " ".join(c.name for c in cmds)
    lines.append(f'complete -c tunewiz -n "not __fish_seen_subcommand_from {names}" -a "{names}"')
    for c in cmds:
        seen = f'__fish_seen_subcommand_from {c.name}'
        if c.takes or c.words:
            source = {"run": FISH_RUNS, "preset": FISH_PRESETS}.get(c.takes or "", " ".join(c.words))
            lines.append(f'complete -c tunewiz -n "{seen}" -a "{source}"')
        for option in c.options:
            lines.append(f'complete -c tunewiz -n "{seen}" -l {option[2:]}')
    return "\n".join(lines) + "\n"


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for `shell`."""
    return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell](commands(parser))
