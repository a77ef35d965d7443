"""Plain-text rendering of events, durations and memory sizes, for the CLI and the app."""

from __future__ import annotations

import time

from tunewiz.engine.run.events import Event


def duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA"}
"""Methods as the guide names them; specs and JSON keep the lower-case values."""


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


GIB = 1024**3
MEMORY_UNIT = "GiB"
"""The one unit memory is written in, everywhere (GPU makers' "24 GB" cards hold 24 GiB, as nvidia-smi shows)."""


def memory(n: int | float | None) -> str:
    """A memory size in binary units: '24 GiB' from 10 GiB up, '9.1 GiB', '270 MiB'; '?' when unknown."""
    if n is None:
        return "?"
    if n < GIB:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / GIB:.0f} GiB" if n >= 10 * GIB else f"{n / GIB:.1f} GiB"


def _num(value: object, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def format_event(event: Event) -> str:
    """One line (or a few, for samples and errors) describing `event`."""
    clock = time.strftime("%H:%M:%S", time.localtime(event.time))
    d = event.data
    kind = event.type
    if kind == "started":
        resumed = f", resuming from step {d['resumed_from_step']}" if d.get("resumed_from_step") else ""
        body = f"engine started (pid {d.get('pid')} on {d.get('host')}{resumed})"
    elif kind == "phase":
        body = f"[{d.get('phase')}] {d.get('message')}"
    elif kind == "step":
        body = (f"step {d['step']}/{d['total_steps']}  epoch {_num(d.get('epoch'), '.2f')}  "
                f"loss {_num(d.get('loss'), '.4f')}  lr {_num(d.get('learning_rate'), '.2e')}  "
                f"grad {_num(d.get('grad_norm'), '.3f')}  {_num(d.get('tokens_per_s'), ',.0f')} tok/s  "
                f"elapsed {duration(d.get('elapsed_s'))}  eta {duration(d.get('eta_s'))}")
    elif kind == "eval":
        body = f"eval at step {d['step']}: loss {_num(d.get('eval_loss'), '.4f')}"
    elif kind == "preference":
        body = (f"{'eval ' if d.get('split') == 'eval' else ''}rewards at step {d['step']}: chosen "
                f"{_num(d.get('chosen_reward'), '.3f')}  rejected {_num(d.get('rejected_reward'), '.3f')}  margin "
                f"{_num(d.get('margin'), '.3f')}  accuracy {_num(d.get('accuracy'), '.0%')}")
    elif kind == "gpu":
        parts = [f"gpu{g.get('index')} {(g.get('mem_used_bytes') or 0) / 2**30:.1f}/"
                 f"{(g.get('mem_total_bytes') or 0) / 2**30:.0f} GiB {g.get('util_pct', '-')}%"
                 for g in d.get("devices", [])]
        process = d.get("process") or {}
        if process:
            parts.append(f"cpu {process.get('cpu_pct', 0):.0f}%  ram {(process.get('rss_bytes') or 0) / 2**30:.1f} GiB")
        body = "  ".join(parts) or "no resource data"
    elif kind == "sample":
        lines = [f"samples at step {d['step']}:"]
        for sample in d.get("samples", []):
            prompt = str(sample.get("prompt", "")).replace("\n", " ")[:70]
            answer = str(sample.get("answer", "")).replace("\n", " ")[:120]
            lines.append(f"    {prompt!r} -> {answer!r}")
        body = "\n".join(lines)
    elif kind == "checkpoint":
        body = f"checkpoint at step {d['step']}: {d['path']}"
    elif kind == "log":
        body = f"{d.get('level')}: {d.get('message')}"
    elif kind == "alert":
        where = f" at step {d['step']}" if d.get("step") is not None else ""
        body = f"ALERT {d.get('code')}{where}: {d.get('message')}\n    try: {d.get('hint')}"
    elif kind == "error":
        body = f"ERROR {d.get('error_type')}: {d.get('message')}"
        if d.get("hint"):
            body += f"\n    hint: {d['hint']}"
    elif kind == "finished":
        body = f"finished: {d.get('status')} at step {d.get('step', '-')}"
        if d.get("output_dir") and d.get("status") == "completed":
            body += f"; adapter in {d['output_dir']}"
    else:
        body = str(d)
    return f"{clock} {body}"
