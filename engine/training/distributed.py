"""Several GPUs: which ones a run uses, the batch arithmetic, and the commands that start the engine's ranks.

A spec's effective batch is `training.micro_batch_size × training.gradient_accumulation` sequences per optimiser
step, whatever the number of GPUs: on N GPUs each rank runs micro_batch_size sequences per pass and 1/N of the
accumulation (`keep_effective_batch`, which every rank applies to its copy of the spec), so a preset trains the
same way on 1 or 4 GPUs, only faster. The saved spec is never rewritten for a GPU count.

One host starts its ranks through `accelerate launch` (`accelerate_command`); `torchrun_command` is the DDP
equivalent; several hosts run the same command once per host with their own `--machine_rank`, which
`print_launch` spells out, and `slurm_script` writes as one sbatch job.

Nothing here imports torch or accelerate: the commands are built as text, for another process to run.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tunewiz.engine.errors import TunewizError

if TYPE_CHECKING:
    from tunewiz.engine.config.spec import RunSpec
    from tunewiz.engine.run.rundir import RunDir

DEFAULT_PORT = 29500
RUN_DIR_PLACEHOLDER = "$RUN_DIR"
MAIN_HOST_PLACEHOLDER = "MAIN_HOST"
WORKER_MODULE = "tunewiz.engine.run.worker"
RANK_WORKER_FLAG = "--rank-worker"
DOCTOR_HINT = "`tunewiz doctor` lists the GPUs this machine sees (CUDA_VISIBLE_DEVICES limits them)."

# accelerate's own FSDP settings (`accelerate launch --help`, accelerate 1.x). Transformers' Trainer adds the
# PEFT wrap policy (LoRA layers wrapped on their own) and, for QLoRA, the 4-bit storage dtype's mixed precision.
FSDP_FLAGS = (
    "--use_fsdp",
    "--fsdp_version", "1",
    "--fsdp_sharding_strategy", "FULL_SHARD",
    "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
    "--fsdp_use_orig_params", "true",
    "--fsdp_cpu_ram_efficient_loading", "true",
    "--fsdp_sync_module_states", "true",
    "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
    "--fsdp_backward_prefetch", "BACKWARD_PRE",
)

_SHELL_VARIABLE = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_]*\})")


# ---------------------------------------------------------------------------------------------
# Which GPUs


def resolve_gpus(gpus: int | list[int], visible: int) -> list[int]:
    """The GPU indices (among the `visible` ones) a run uses; [] means CPU training.

    A count N takes the first N visible GPUs, 0 all of them; a list is used as given. On a machine without
    GPUs the default (1) and 0 give [] (train on the CPU); asking for more is an error.
    """
    if isinstance(gpus, bool) or not isinstance(gpus, (int, list)):
        raise TunewizError(f"training.gpus = {gpus!r} is neither a GPU count nor a list of GPU indices",
                           hint="Write a count like 2 (0 means all GPUs) or a list like [0, 2].")
    if isinstance(gpus, int):
        if gpus < 0:
            raise TunewizError(f"training.gpus = {gpus} is negative",
                               hint="Write a count (0 means all visible GPUs) or a list like [0, 2].")
        if visible == 0:
            if gpus <= 1:
                return []
            raise TunewizError(f"training.gpus = {gpus} asks for {gpus} GPUs, but this machine sees none",
                               hint=f"Train on the CPU with training.gpus = 1, or run on a GPU machine. {DOCTOR_HINT}")
        if gpus > visible:
            raise TunewizError(f"training.gpus = {gpus} asks for {gpus} GPUs, but only {visible} "
                               f"{'is' if visible == 1 else 'are'} visible",
                               hint=f"Set training.gpus to at most {visible} (or 0 for all). {DOCTOR_HINT}")
        return list(range(gpus or visible))
    if not gpus:
        raise TunewizError("training.gpus = [] names no GPU",
                           hint="Write a count (1 is the default, 0 means all) or a list like [0, 2].")
    if visible == 0:
        raise TunewizError(f"training.gpus = {gpus} names GPUs, but this machine sees none",
                           hint=f"Train on the CPU with training.gpus = 1, or run on a GPU machine. {DOCTOR_HINT}")
    for index in gpus:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < visible:
            raise TunewizError(f"training.gpus: GPU index {index!r} is out of range: {visible} GPU"
                               f"{'' if visible == 1 else 's'} visible, numbered 0 to {visible - 1}",
                               hint=f"Indices count the visible GPUs from 0. {DOCTOR_HINT}")
    if len(set(gpus)) != len(gpus):
        raise TunewizError(f"training.gpus = {gpus} names a GPU twice", hint="List each GPU index once.")
    return list(gpus)


def visible_gpu_count() -> int:
    """How many NVIDIA GPUs CUDA will see on this machine (NVML; no torch)."""
    from tunewiz.engine.planning import hardware

    return len(hardware.probe(check_libraries=False).gpus)


# ---------------------------------------------------------------------------------------------
# Effective batch


def effective_batch(micro_batch: int, accumulation: int, gpus: int) -> int:
    """Sequences per optimiser step: micro-batch × accumulation × GPUs."""
    return micro_batch * accumulation * gpus


def accumulation_for(effective: int, micro_batch: int, gpus: int) -> tuple[int, int]:
    """The accumulation that keeps `effective` sequences per step on `gpus` GPUs, and the effective batch it gives.

    When `effective` is not a multiple of micro_batch × gpus, the nearest accumulation (at least 1) wins, the
    smaller one on a tie; the second value then differs from `effective`, for callers to show.
    """
    per_pass = micro_batch * max(gpus, 1)
    low = max(1, effective // per_pass)
    high = low + 1
    best = min((low, high), key=lambda acc: (abs(acc * per_pass - effective), acc))
    return best, best * per_pass


def _gpu_word(n: int) -> str:
    return f"{n} GPU{'' if n == 1 else 's'}"


def keep_effective_batch(spec: RunSpec, gpus: int) -> tuple[RunSpec, str]:
    """A copy of `spec` with the per-GPU accumulation that keeps its effective batch on `gpus` GPUs, and a line
    saying so (the engine shows it when training starts)."""
    t = spec.training
    n = max(gpus, 1)
    target = effective_batch(t.micro_batch_size, t.gradient_accumulation, 1)
    accumulation, effective = accumulation_for(target, t.micro_batch_size, n)
    adjusted = copy.deepcopy(spec)
    adjusted.training.gradient_accumulation = accumulation
    message = (f"effective batch {effective} = {t.micro_batch_size} per GPU × {accumulation} accumulation × "
               f"{_gpu_word(n)}")
    if n > 1:
        message += f" (was {t.micro_batch_size} × {t.gradient_accumulation} × 1)"
    if effective != target:
        message += (f"; the preset's {target} cannot be kept on {_gpu_word(n)}: a smaller "
                    f"training.micro_batch_size gets closer")
    return adjusted, message


# ---------------------------------------------------------------------------------------------
# Launch commands


@dataclass(frozen=True)
class LaunchPlan:
    """How the engine's ranks start: which GPUs of each machine, how they share the model, and where rank 0 is.

    `machine_rank` and `main_process_ip` may be shell text such as "$SLURM_NODEID" in printed commands.
    """

    gpu_ids: list[int]
    strategy: Literal["ddp", "fsdp"] = "ddp"
    num_machines: int = 1
    machine_rank: int | str = 0
    main_process_ip: str | None = None
    main_process_port: int = DEFAULT_PORT
    method: Literal["lora", "qlora"] = "lora"

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu_ids", list(self.gpu_ids))
        if not self.gpu_ids:
            raise TunewizError("a multi-GPU launch needs at least one GPU",
                               hint="Without GPUs, `tunewiz train` trains on the CPU in one process.")
        if self.strategy not in ("ddp", "fsdp"):
            raise TunewizError(f"unknown strategy {self.strategy!r}", hint="Use `ddp` or `fsdp`.")
        if self.num_machines < 1:
            raise TunewizError(f"{self.num_machines} hosts: a run needs at least one", hint="Use --hosts 1 or more.")

    @property
    def num_processes(self) -> int:
        """Ranks in all: one per GPU on every machine."""
        return len(self.gpu_ids) * self.num_machines

    @property
    def default_gpu_ids(self) -> bool:
        """True when the machine uses its first GPUs in order (0, 1, ...), which needs no GPU selection."""
        return self.gpu_ids == list(range(len(self.gpu_ids)))

    def on_machine(self, rank: int | str) -> LaunchPlan:
        """The same plan, as started on machine `rank`."""
        return dataclasses.replace(self, machine_rank=rank)

    def _main_ip(self) -> str:
        if not self.main_process_ip:
            raise TunewizError(f"{self.num_machines} hosts need the address of host 0",
                               hint="Pass --main-ip HOST (the SLURM script finds it itself).")
        return self.main_process_ip


def _worker_args(run_dir: str, extra_args: list[str] | None) -> list[str]:
    return [WORKER_MODULE, run_dir, RANK_WORKER_FLAG, *(extra_args or [])]


def accelerate_command(plan: LaunchPlan, run_dir: str, extra_args: list[str] | None = None) -> list[str]:
    """The argv that starts this machine's engine ranks through `accelerate launch`.

    Mixed precision is left to the engine's Trainer (it sets bf16 itself), so accelerate is told `no`.
    """
    argv = [sys.executable, "-m", "accelerate.commands.launch",
            "--num_processes", str(plan.num_processes),
            "--num_machines", str(plan.num_machines),
            "--machine_rank", str(plan.machine_rank)]
    if plan.num_machines > 1:
        argv += ["--main_process_ip", plan._main_ip()]
    argv += ["--main_process_port", str(plan.main_process_port)]
    if plan.num_machines == 1 or not plan.default_gpu_ids:
        argv += ["--gpu_ids", ",".join(str(i) for i in plan.gpu_ids)]
    argv += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if plan.strategy == "fsdp":
        argv += FSDP_FLAGS
    elif plan.num_processes > 1:
        argv.append("--multi_gpu")
    return argv + ["--module", *_worker_args(run_dir, extra_args)]


def torchrun_command(plan: LaunchPlan, run_dir: str, extra_args: list[str] | None = None) -> list[str]:
    """The DDP equivalent of `accelerate_command` through torchrun (FSDP runs through accelerate only)."""
    if plan.strategy != "ddp":
        raise TunewizError("the torchrun command is for DDP only",
                           hint="Start FSDP runs through accelerate (`accelerate_command`).")
    argv = [] if plan.default_gpu_ids else ["env", f"CUDA_VISIBLE_DEVICES={','.join(map(str, plan.gpu_ids))}"]
    argv += [sys.executable, "-m", "torch.distributed.run",
             "--nnodes", str(plan.num_machines),
             "--node_rank", str(plan.machine_rank),
             "--nproc_per_node", str(len(plan.gpu_ids))]
    if plan.num_machines > 1:
        argv += ["--master_addr", plan._main_ip()]
    argv += ["--master_port", str(plan.main_process_port)]
    return argv + ["-m", *_worker_args(run_dir, extra_args)]


def shell_join(argv: list[str]) -> str:
    """One shell line: every word quoted, except that a bare `$NAME` stays a variable (in double quotes)."""
    return " ".join(f'"{word}"' if _SHELL_VARIABLE.fullmatch(word) else shlex.quote(word) for word in argv)


def _is_variable(text: str) -> bool:
    return bool(_SHELL_VARIABLE.fullmatch(text))


def slurm_script(plan: LaunchPlan, spec_path: str, run_dir: str, job_name: str) -> str:
    """An sbatch script that starts one accelerate launcher per node, each with its node's machine rank."""
    per_node = dataclasses.replace(plan, machine_rank="$SLURM_NODEID", main_process_ip="$MAIN_PROCESS_IP")
    inner = shell_join(accelerate_command(per_node, "$RUN_DIR"))
    if run_dir in (RUN_DIR_PLACEHOLDER, "${RUN_DIR}"):
        run_dir_line = ': "${RUN_DIR:?set RUN_DIR to the run directory}"'
    else:
        run_dir_line = f'RUN_DIR="{run_dir}"' if _is_variable(run_dir) else f"RUN_DIR={shlex.quote(run_dir)}"
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={plan.num_machines}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={len(plan.gpu_ids)}",
        "#SBATCH --exclusive",
        f"# tunewiz: {plan.num_machines} node(s) × {_gpu_word(len(plan.gpu_ids))}, {plan.strategy.upper()}, "
        f"{plan.method}; spec {spec_path}",
        "# The run directory must be on storage that every node mounts at the same path (NFS, Lustre, ...):",
        "# rank 0 writes the events, checkpoints and adapter there, and `tunewiz attach` reads them.",
        "# The Python below must also exist at the same path on every node (a shared install).",
        "set -euo pipefail",
        run_dir_line,
        "export RUN_DIR",
        'MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "export MAIN_PROCESS_IP",
        "# One task per node; single quotes so that each task reads its own $SLURM_NODEID.",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(inner)}",
        "",
    ])


# ---------------------------------------------------------------------------------------------
# `tunewiz train PRESET --print-launch`


def plan_strategy(strategy: str, fits_one_gpu: bool | None = None) -> Literal["ddp", "fsdp"]:
    """The strategy a plan uses: `auto` is DDP unless the model is known not to fit one GPU."""
    if strategy in ("ddp", "fsdp"):
        return strategy  # type: ignore[return-value]
    return "fsdp" if fits_one_gpu is False else "ddp"


def launch_plan(spec: RunSpec, hosts: int = 1, gpus_per_host: int | None = None, main_ip: str | None = None,
                *, visible: int | None = None) -> LaunchPlan:
    """The plan for `spec` on `hosts` machines of `gpus_per_host` GPUs each.

    Without `gpus_per_host`, the spec's training.gpus decides, checked against this machine's `visible` GPUs
    (probed when None) where it must be: on one host, or when training.gpus = 0 means "all of them".
    """
    if hosts < 1:
        raise TunewizError(f"--hosts {hosts}: a run needs at least one host", hint="Use --hosts 1 or more.")
    wanted = spec.training.gpus
    if gpus_per_host is not None:
        if gpus_per_host < 1:
            raise TunewizError(f"--gpus-per-host {gpus_per_host}: each host needs at least one GPU",
                               hint="Without GPUs, `tunewiz train` trains on the CPU in one process.")
        gpu_ids = list(range(gpus_per_host))
    elif hosts > 1 and (isinstance(wanted, list) or wanted > 0):
        gpu_ids = list(wanted) if isinstance(wanted, list) else list(range(wanted))
    else:
        count = visible_gpu_count() if visible is None else visible
        gpu_ids = resolve_gpus(wanted, count)
        if not gpu_ids:
            raise TunewizError("this machine sees no GPU, so it cannot tell how many the hosts have",
                               hint="Say how many each host has: --gpus-per-host G.")
    ip = main_ip or (MAIN_HOST_PLACEHOLDER if hosts > 1 else None)
    return LaunchPlan(gpu_ids=gpu_ids, strategy=plan_strategy(spec.training.strategy), num_machines=hosts,
                      main_process_ip=ip, method=spec.method)


def print_launch(spec: RunSpec, spec_path: str, hosts: int = 1, gpus_per_host: int | None = None,
                 main_ip: str | None = None, *, run_dir: str = RUN_DIR_PLACEHOLDER,
                 visible: int | None = None) -> str:
    """What `tunewiz train PRESET --print-launch` prints: the batch line, the commands per host, a SLURM script."""
    plan = launch_plan(spec, hosts, gpus_per_host, main_ip, visible=visible)
    _, batch_line = keep_effective_batch(spec, plan.num_processes)
    per_host = _gpu_word(len(plan.gpu_ids))
    lines = [f"{spec.name}: {hosts} host{'' if hosts == 1 else 's'} × {per_host} = {plan.num_processes} "
             f"rank{'' if plan.num_processes == 1 else 's'}, {plan.strategy.upper()}, {spec.method} "
             f"(spec {spec_path})",
             batch_line]
    if spec.training.strategy == "auto":
        lines.append("training.strategy is auto: printed for DDP, which needs the model to fit one GPU; "
                     "--set training.strategy=fsdp shards it instead")
    if plan.strategy == "fsdp" and spec.method == "qlora":
        lines.append("QLoRA under FSDP stores the 4-bit weights as bf16 (bnb_4bit_quant_storage) so FSDP can "
                     "shard them")
    if _is_variable(run_dir):
        lines.append(f"{run_dir} stands for the run directory, on storage every host sees")
    else:
        lines.append(f"run directory: {run_dir}")
    if plan.main_process_ip == MAIN_HOST_PLACEHOLDER:
        lines.append(f"{MAIN_HOST_PLACEHOLDER} stands for the address of host 0 (pass --main-ip HOST to fill it "
                     f"in; the SLURM script finds it itself)")
    lines += ["", "accelerate (one line per host; add --resume at the end to continue a stopped run from its "
                  "last checkpoint):"]
    lines += _per_host(plan, run_dir, accelerate_command)
    lines.append("")
    if plan.strategy == "ddp":
        lines.append("torchrun (the same DDP run without accelerate):")
        lines += _per_host(plan, run_dir, torchrun_command)
    else:
        lines.append("torchrun: not for FSDP; FSDP runs start through accelerate")
    job = re.sub(r"[^A-Za-z0-9._-]+", "-", f"tunewiz-{spec.name}")
    lines += ["", f"SLURM (save as {job}.sbatch, then: sbatch {job}.sbatch):", "",
              slurm_script(plan, spec_path, run_dir, job)]
    lines.append(f"watch it from any machine that sees the run directory: tunewiz attach {run_dir}")
    return "\n".join(lines)


def _per_host(plan: LaunchPlan, run_dir: str, build: Callable[[LaunchPlan, str], list[str]]) -> list[str]:
    """One command line per host, each with its machine rank spelled out."""
    if plan.num_machines == 1:
        return [f"  {shell_join(build(plan, run_dir))}"]
    return [f"  host {rank}{' (main)' if rank == 0 else ''}: {shell_join(build(plan.on_machine(rank), run_dir))}"
            for rank in range(plan.num_machines)]


def prepare_launch(spec: RunSpec, spec_path: str, hosts: int = 1, gpus_per_host: int | None = None,
                   main_ip: str | None = None, *, visible: int | None = None) -> tuple[RunDir, str]:
    """Create a run directory for a launch started by hand (nothing is started) and the text saying how.

    The spec is saved as it is: each rank derives its own accumulation from it (`keep_effective_batch`).
    """
    from tunewiz.engine.run import rundir

    if visible is None and gpus_per_host is None:
        visible = visible_gpu_count()
    launch_plan(spec, hosts, gpus_per_host, main_ip, visible=visible)  # refuses an impossible layout, before a run
    run = rundir.create(spec)
    text = print_launch(spec, spec_path, hosts, gpus_per_host, main_ip, run_dir=str(run.path), visible=visible)
    return run, f"prepared run {run.run_id} (nothing is started; it lists as dead until its ranks start)\n{text}"
