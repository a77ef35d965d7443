"""Generate docs/run-spec.md from the spec's field documentation: `python -m tunewiz.engine.config.spec_doc`."""

from __future__ import annotations

from tunewiz.engine.config.spec import field_docs


def render() -> str:
    lines = [
        "# The run spec",
        "",
        "A run spec is a TOML file that says everything a run needs. Built-in presets live in",
        "`presets/runs/`, your own in `tunewiz locate presets`; every run directory holds its resolved",
        "spec as `spec.toml`, which relaunches the run: `tunewiz train path/to/spec.toml`.",
        "Override any key from the command line: `tunewiz train demo --set training.max_steps=20`.",
        "",
        "Generated from `engine/config/spec.py` by `python -m tunewiz.engine.config.spec_doc`; do not edit by hand.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for key, type_name, default, doc in field_docs():
        lines.append(f"| `{key}` | {type_name} | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
