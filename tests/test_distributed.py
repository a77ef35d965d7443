"""Multi-GPU planning without GPUs: which GPUs a run uses, the batch arithmetic, and the launch commands,
each parsed by accelerate's (or torchrun's) own argument parser."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_import_hygiene import TRAINING_STACK, _loaded_after_import
from tunewiz.engine import locations
from tunewiz.engine.cli import main as cli
from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.errors import TunewizError
from tunewiz.engine.run import rundir
from tunewiz.engine.training import distributed
from tunewiz.engine.training.distributed import LaunchPlan, accelerate_command, torchrun_command

pytestmark = pytest.mark.timeout(60)

RUN = "/shared/runs/r1"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def _substitute(argv: list[str]) -> list[str]:
    """Shell variables as a shell would fill them in, for parsing."""
    return [{"$SLURM_NODEID": "1", "$MAIN_PROCESS_IP": "node0", "$RUN_DIR": RUN}.get(word, word) for word in argv]


def parse_accelerate(argv: list[str]):  # type: ignore[no-untyped-def]
    from accelerate.commands.launch import launch_command_parser

    assert argv[:3] == ACCELERATE
    return launch_command_parser().parse_args(_substitute(argv[3:]))


def parse_torchrun(argv: list[str]):  # type: ignore[no-untyped-def]
    from torch.distributed.run import get_args_parser

    start = argv.index(sys.executable)
    assert argv[start + 1:start + 3] == ["-m", "torch.distributed.run"]
    return get_args_parser().parse_args(_substitute(argv[start + 3:]))


# ------------------------------------------------------------------ resolve_gpus


@pytest.mark.parametrize(("gpus", "visible", "expected"), [
    (1, 0, []),  # the default on a CPU-only machine: CPU training
    (0, 0, []),
    (1, 4, [0]),
    (2, 4, [0, 1]),
    (0, 4, [0, 1, 2, 3]),
    (4, 4, [0, 1, 2, 3]),
    ([2, 0], 4, [2, 0]),
    ([3], 4, [3]),
])
def test_resolve_gpus(gpus: int | list[int], visible: int, expected: list[int]) -> None:
    assert distributed.resolve_gpus(gpus, visible) == expected


@pytest.mark.parametrize(("gpus", "visible", "message", "hint"), [
    (3, 2, "only 2 are visible", "tunewiz doctor"),
    (2, 1, "only 1 is visible", "at most 1"),
    (2, 0, "sees none", "training.gpus = 1"),
    ([0], 0, "sees none", "CPU"),
    ([0, 4], 4, "index 4 is out of range: 4 GPUs visible, numbered 0 to 3", "tunewiz doctor"),
    ([-1], 2, "index -1 is out of range", "count the visible GPUs from 0"),
    ([1, 1], 2, "names a GPU twice", "once"),
    ([], 2, "names no GPU", "count"),
    (-1, 2, "negative", "0 means all"),
])
def test_resolve_gpus_errors(gpus: int | list[int], visible: int, message: str, hint: str) -> None:
    with pytest.raises(TunewizError) as caught:
        distributed.resolve_gpus(gpus, visible)
    assert message in str(caught.value)
    assert caught.value.hint and hint in caught.value.hint


# ------------------------------------------------------------------ effective batch


def test_effective_batch_is_the_product() -> None:
    assert distributed.effective_batch(2, 8, 1) == 16
    assert distributed.effective_batch(2, 4, 2) == 16
    assert distributed.effective_batch(4, 1, 8) == 32


@pytest.mark.parametrize(("effective", "micro", "gpus", "expected"), [
    (16, 2, 1, (8, 16)),
    (16, 2, 2, (4, 16)),
    (16, 2, 4, (2, 16)),
    (16, 2, 8, (1, 16)),
    (16, 2, 16, (1, 32)),  # cannot go below one accumulation step
    (4, 4, 8, (1, 32)),
    (12, 2, 4, (1, 8)),  # 1.5 steps: a tie between 8 and 16 goes to the smaller
    (20, 2, 4, (2, 16)),  # 2.5 steps: 16 and 24 tie, the smaller wins
    (22, 2, 4, (3, 24)),  # 2.75 steps: 24 is nearer than 16
    (10, 3, 2, (2, 12)),  # 1.67 steps: 12 is nearer than 6
    (7, 1, 1, (7, 7)),
    (16, 2, 0, (8, 16)),  # no GPU: one process
])
def test_accumulation_for(effective: int, micro: int, gpus: int, expected: tuple[int, int]) -> None:
    assert distributed.accumulation_for(effective, micro, gpus) == expected


def test_keep_effective_batch_lowers_the_accumulation_and_leaves_the_spec_alone() -> None:
    spec = RunSpec()
    spec.training.micro_batch_size, spec.training.gradient_accumulation = 2, 8
    adjusted, message = distributed.keep_effective_batch(spec, 2)
    assert adjusted.training.gradient_accumulation == 4
    assert adjusted.training.micro_batch_size == 2
    assert spec.training.gradient_accumulation == 8  # a copy, not the caller's spec
    assert adjusted.lora == spec.lora and adjusted.training.gpus == spec.training.gpus
    assert message == "effective batch 16 = 2 per GPU × 4 accumulation × 2 GPUs (was 2 × 8 × 1)"


def test_keep_effective_batch_on_one_gpu_and_when_it_cannot_be_kept() -> None:
    spec = RunSpec()
    spec.training.micro_batch_size, spec.training.gradient_accumulation = 2, 8
    same, message = distributed.keep_effective_batch(spec, 1)
    assert same.training.gradient_accumulation == 8
    assert message == "effective batch 16 = 2 per GPU × 8 accumulation × 1 GPU"
    spec.training.micro_batch_size, spec.training.gradient_accumulation = 4, 1
    adjusted, message = distributed.keep_effective_batch(spec, 8)
    assert adjusted.training.gradient_accumulation == 1
    assert message.startswith("effective batch 32 = 4 per GPU × 1 accumulation × 8 GPUs (was 4 × 1 × 1)")
    assert "4 cannot be kept on 8 GPUs" in message and "micro_batch_size" in message


# ------------------------------------------------------------------ LaunchPlan and the commands


def test_launch_plan_counts_processes_and_rejects_nonsense() -> None:
    assert LaunchPlan(gpu_ids=[0, 1]).num_processes == 2
    assert LaunchPlan(gpu_ids=[0, 1, 2, 3], num_machines=3, main_process_ip="n0").num_processes == 12
    plan = LaunchPlan(gpu_ids=[0, 1], num_machines=2, main_process_ip="n0")
    assert plan.on_machine(1).machine_rank == 1 and plan.machine_rank == 0
    for bad in ({"gpu_ids": []}, {"gpu_ids": [0], "strategy": "zero3"}, {"gpu_ids": [0], "num_machines": 0}):
        with pytest.raises(TunewizError):
            LaunchPlan(**bad)  # type: ignore[arg-type]


def test_accelerate_command_for_two_gpus_with_ddp() -> None:
    argv = accelerate_command(LaunchPlan(gpu_ids=[0, 1]), RUN)
    assert argv == ACCELERATE + [
        "--num_processes", "2", "--num_machines", "1", "--machine_rank", "0", "--main_process_port", "29500",
        "--gpu_ids", "0,1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
        "--module", "tunewiz.engine.run.worker", RUN, "--rank-worker"]
    args = parse_accelerate(argv)
    assert (args.num_processes, args.num_machines, args.machine_rank, args.gpu_ids) == (2, 1, 0, "0,1")
    assert args.multi_gpu and args.module and not args.use_fsdp
    assert (args.training_script, args.training_script_args) == ("tunewiz.engine.run.worker", [RUN, "--rank-worker"])


def test_accelerate_command_for_one_gpu_is_a_single_process() -> None:
    argv = accelerate_command(LaunchPlan(gpu_ids=[3]), RUN, ["--resume"])
    assert "--multi_gpu" not in argv
    args = parse_accelerate(argv)
    assert (args.num_processes, args.gpu_ids) == (1, "3")
    assert args.training_script_args == [RUN, "--rank-worker", "--resume"]


def test_accelerate_command_for_fsdp_on_eight_gpus() -> None:
    argv = accelerate_command(LaunchPlan(gpu_ids=list(range(8)), strategy="fsdp", method="qlora"), RUN)
    assert "--multi_gpu" not in argv
    words = " ".join(argv)
    assert " ".join(distributed.FSDP_FLAGS) in words
    args = parse_accelerate(argv)
    assert args.use_fsdp and args.num_processes == 8 and args.gpu_ids == "0,1,2,3,4,5,6,7"
    assert args.fsdp_version == "1" and args.fsdp_sharding_strategy == "FULL_SHARD"
    assert args.fsdp_auto_wrap_policy == "TRANSFORMER_BASED_WRAP"
    assert args.fsdp_state_dict_type == "SHARDED_STATE_DICT" and args.fsdp_backward_prefetch == "BACKWARD_PRE"
    assert (args.fsdp_use_orig_params, args.fsdp_cpu_ram_efficient_loading, args.fsdp_sync_module_states) == \
           ("true", "true", "true")
    assert args.mixed_precision == "no" and args.dynamo_backend == "no"


def test_accelerate_turns_the_fsdp_command_into_its_fsdp_settings(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """accelerate's own validation and environment step, as `accelerate launch` runs them (no GPU needed)."""
    import accelerate.commands.launch as accelerate_launch
    import accelerate.utils.launch as accelerate_launch_utils
    from accelerate.commands.launch import _validate_launch_command
    from accelerate.utils.launch import prepare_multi_gpu_env

    # No accelerate config file of the user's leaks in.
    monkeypatch.setattr(accelerate_launch, "default_config_file", str(tmp_path / "none.yaml"))
    # accelerate 1.16 names the devices through the variable of the host's accelerator, and this test's host has
    # none; the command runs on a CUDA host (accelerate 1.15 set CUDA_VISIBLE_DEVICES wherever it ran).
    monkeypatch.setattr(accelerate_launch_utils, "get_torch_accelerator_backend",
                        lambda check_available=True: ("cuda", None), raising=False)
    args, _defaults, _precision = _validate_launch_command(
        parse_accelerate(accelerate_command(LaunchPlan(gpu_ids=[0, 1, 2, 3], strategy="fsdp"), RUN)))
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "1"
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD" and env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true" and env["FSDP_SYNC_MODULE_STATES"] == "true"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and env["ACCELERATE_MIXED_PRECISION"] == "no"
    args, _defaults, _precision = _validate_launch_command(parse_accelerate(accelerate_command(
        LaunchPlan(gpu_ids=[0, 1]), RUN)))
    assert args.multi_gpu and not args.use_fsdp
    assert prepare_multi_gpu_env(args)["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_accelerate_command_for_several_hosts() -> None:
    plan = LaunchPlan(gpu_ids=[0, 1, 2, 3], num_machines=2, main_process_ip="node0", main_process_port=29600)
    for rank in range(2):
        argv = accelerate_command(plan.on_machine(rank), RUN)
        assert "--gpu_ids" not in argv  # each host uses its first four GPUs
        args = parse_accelerate(argv)
        assert (args.num_processes, args.num_machines, args.machine_rank) == (8, 2, rank)
        assert (args.main_process_ip, args.main_process_port) == ("node0", 29600)
    chosen = accelerate_command(LaunchPlan(gpu_ids=[2, 3], num_machines=2, main_process_ip="node0"), RUN)
    assert parse_accelerate(chosen).gpu_ids == "2,3"
    with pytest.raises(TunewizError, match="address of host 0"):
        accelerate_command(LaunchPlan(gpu_ids=[0], num_machines=2), RUN)


def test_accelerate_command_with_shell_variables_parses_once_filled_in() -> None:
    plan = LaunchPlan(gpu_ids=[0, 1], num_machines=4, machine_rank="$SLURM_NODEID", main_process_ip="$MAIN_PROCESS_IP")
    argv = accelerate_command(plan, "$RUN_DIR")
    line = distributed.shell_join(argv)
    assert '--machine_rank "$SLURM_NODEID"' in line and '"$RUN_DIR"' in line
    assert shlex.split(line) == argv
    args = parse_accelerate(argv)
    assert (args.machine_rank, args.main_process_ip, args.num_processes) == (1, "node0", 8)


def test_torchrun_command() -> None:
    argv = torchrun_command(LaunchPlan(gpu_ids=[0, 1]), RUN)
    assert argv == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0",
                    "--nproc_per_node", "2", "--master_port", "29500", "-m", "tunewiz.engine.run.worker", RUN,
                    "--rank-worker"]
    args = parse_torchrun(argv)
    assert (args.nnodes, args.nproc_per_node, args.module, args.training_script) == (
        "1", "2", True, "tunewiz.engine.run.worker")
    multi = torchrun_command(LaunchPlan(gpu_ids=[0, 1, 2, 3], num_machines=2, main_process_ip="node0").on_machine(1),
                             RUN, ["--resume"])
    args = parse_torchrun(multi)
    assert (args.nnodes, args.node_rank, args.nproc_per_node, args.master_addr) == ("2", 1, "4", "node0")
    assert args.training_script_args == [RUN, "--rank-worker", "--resume"]
    chosen = torchrun_command(LaunchPlan(gpu_ids=[2, 3]), RUN)
    assert chosen[:2] == ["env", "CUDA_VISIBLE_DEVICES=2,3"] and parse_torchrun(chosen).nproc_per_node == "2"
    with pytest.raises(TunewizError, match="DDP only"):
        torchrun_command(LaunchPlan(gpu_ids=[0, 1], strategy="fsdp"), RUN)


def test_slurm_script() -> None:
    plan = LaunchPlan(gpu_ids=[0, 1, 2, 3], num_machines=3, main_process_ip="ignored", strategy="fsdp")
    script = distributed.slurm_script(plan, "/home/me/big.toml", "/shared/runs/r 1", "tunewiz-big")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--job-name=tunewiz-big", "--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=4",
                      "--exclusive"):
        assert f"#SBATCH {directive}" in lines
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])  # sbatch stops reading there
    assert "RUN_DIR='/shared/runs/r 1'" in lines
    assert 'MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
    assert any("same path" in line and line.startswith("#") for line in lines)  # shared storage, said
    assert "/home/me/big.toml" in script
    srun = next(line for line in lines if line.startswith("srun "))
    words = shlex.split(srun)
    assert words[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"]
    inner = shlex.split(words[4])
    args = parse_accelerate(inner)
    assert (args.num_machines, args.num_processes, args.machine_rank, args.main_process_ip) == (3, 12, 1, "node0")
    assert args.use_fsdp and args.training_script_args == [RUN, "--rank-worker"]
    assert bash_syntax_ok(script)


def test_slurm_script_with_the_run_dir_placeholder_requires_it() -> None:
    script = distributed.slurm_script(LaunchPlan(gpu_ids=[0]), "x.toml", "$RUN_DIR", "j")
    assert ': "${RUN_DIR:?set RUN_DIR to the run directory}"' in script.splitlines()
    assert bash_syntax_ok(script)


def bash_syntax_ok(script: str) -> bool:
    return subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True).returncode == 0


# ------------------------------------------------------------------ print_launch and the CLI


def test_print_launch_one_host_from_the_spec() -> None:
    spec = RunSpec(name="mine")
    spec.training.gpus, spec.training.strategy = [1, 3], "ddp"
    text = distributed.print_launch(spec, "mine.toml", visible=4)
    assert "1 host × 2 GPUs = 2 ranks, DDP" in text
    assert "effective batch 8 = 2 per GPU × 2 accumulation × 2 GPUs (was 2 × 4 × 1)" in text
    assert "$RUN_DIR stands for the run directory" in text
    assert "host 1" not in text and "MAIN_HOST" not in text and "strategy is auto" not in text
    command = next(line.strip() for line in text.splitlines() if "accelerate.commands.launch" in line
                   and not line.startswith("srun"))
    assert parse_accelerate(shlex.split(command)).gpu_ids == "1,3"
    assert "CUDA_VISIBLE_DEVICES=1,3" in text  # the torchrun line picks the same GPUs


def test_print_launch_errors() -> None:
    spec = RunSpec()
    with pytest.raises(TunewizError, match="at least one host"):
        distributed.print_launch(spec, "x.toml", hosts=0, gpus_per_host=2)
    with pytest.raises(TunewizError, match="at least one GPU"):
        distributed.print_launch(spec, "x.toml", gpus_per_host=0)
    with pytest.raises(TunewizError) as caught:  # the default spec on a CPU-only machine
        distributed.print_launch(spec, "x.toml", visible=0)
    assert "--gpus-per-host" in (caught.value.hint or "")
    spec.training.gpus = 0
    with pytest.raises(TunewizError):  # "all GPUs" of hosts this machine cannot see
        distributed.print_launch(spec, "x.toml", hosts=2, visible=0)
    spec.training.gpus = 4
    assert "2 hosts × 4 GPUs = 8 ranks" in distributed.print_launch(spec, "x.toml", hosts=2, visible=0)


def test_print_launch_fsdp_several_hosts_without_main_ip() -> None:
    spec = RunSpec(name="big", method="qlora")
    spec.training.strategy = "fsdp"
    text = distributed.print_launch(spec, "big.toml", hosts=2, gpus_per_host=2)
    assert "MAIN_HOST stands for the address of host 0" in text
    assert "--main_process_ip MAIN_HOST" in text
    assert "torchrun: not for FSDP" in text and "torch.distributed.run" not in text
    assert "bnb_4bit_quant_storage" in text and "--use_fsdp" in text


def test_cli_print_launch_prepares_a_run_and_starts_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["train", "demo", "--print-launch", "--hosts", "2", "--gpus-per-host", "4", "--main-ip", "node0"])
    out = capsys.readouterr().out
    assert code == 0, out
    runs = rundir.list_runs()
    assert len(runs) == 1
    run = runs[0]
    assert f"prepared run {run.run_id} (nothing is started" in out
    assert "2 hosts × 4 GPUs = 8 ranks, DDP, lora" in out
    assert "effective batch 32 = 4 per GPU × 1 accumulation × 8 GPUs (was 4 × 1 × 1)" in out
    assert not run.engine_alive() and not run.events_path.exists()
    accelerate_lines = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("  host ")
                        and "accelerate.commands.launch" in line]
    assert len(accelerate_lines) == 2
    for rank, line in enumerate(accelerate_lines):
        args = parse_accelerate(shlex.split(line))
        assert (args.machine_rank, args.num_machines, args.num_processes, args.main_process_ip) == (rank, 2, 8, "node0")
        assert args.training_script_args == [str(run.path), "--rank-worker"]
    torchrun_lines = [line for line in out.splitlines() if "torch.distributed.run" in line]
    assert len(torchrun_lines) == 2 and "--node_rank 1" in torchrun_lines[1]
    assert "#SBATCH --nodes=2" in out and "#SBATCH --gpus-per-node=4" in out
    assert f"tunewiz attach {run.path}" in out


def test_cli_print_launch_saves_the_spec_as_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    # Each rank derives its accumulation from the saved spec, so the spec must not be lowered twice.
    code = cli.main(["train", "demo", "--print-launch", "--gpus-per-host", "2", "--set",
                     "training.gradient_accumulation=8", "--name", "wide"])
    assert code == 0
    assert "effective batch 32 = 4 per GPU × 4 accumulation × 2 GPUs (was 4 × 8 × 1)" in capsys.readouterr().out
    (run,) = rundir.list_runs()
    saved = run.load_spec()
    assert (saved.name, saved.training.gradient_accumulation, saved.training.micro_batch_size) == ("wide", 8, 4)


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "demo", "--hosts", "2"], "go with --print-launch"),
    (["train", "demo", "--print-launch", "--hosts", "0", "--gpus-per-host", "2"], "at least one host"),
    (["train", "demo", "--print-launch", "--gpus-per-host", "-1"], "at least one GPU"),
])
def test_cli_print_launch_bad_values(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not locations.runs_dir().exists() or rundir.list_runs() == []  # nothing prepared


def test_distributed_imports_neither_torch_nor_textual() -> None:
    loaded = _loaded_after_import("tunewiz.engine.training.distributed")
    assert not loaded & {*TRAINING_STACK, "textual"}


def test_the_doc_names_the_flags_it_explains() -> None:
    doc = (Path(ROOT) / "docs" / "multi-gpu.md").read_text()
    for needle in ("--print-launch", "training.gpus", "bnb_4bit_quant_storage", "tunewiz attach", "TUNEWIZ_HOME",
                   "SLURM", "--resume"):
        assert needle in doc, needle
    assert not re.search(r"\bTODO\b", doc)
