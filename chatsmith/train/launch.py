"""`chatsmith sft|rm|dpo|ppo|grpo --num-processes N`: the same command on N processes, through
`accelerate launch` (chatsmith has no launcher of its own).

Without `--accelerate-config`, processes are plain data parallel (`--multi_gpu`: NCCL on GPUs,
gloo on a CPU-only machine, which gives real separate processes); with a config file (the recipes
in recipes/accelerate/: DDP, FSDP, DeepSpeed ZeRO), accelerate sets the strategy. Several machines:
run the same command on each with `--num-machines M --machine-rank R --main-process-ip IP`;
`--num-processes` counts the processes of all machines, as accelerate's does.

The launched processes check that they really are as many as asked (`check_world`): `accelerate
launch --cpu --num_processes 2` silently starts one non-distributed process
(huggingface/accelerate#2741), and a run that silently trains on one process with another's
batch size is worse than an error.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from typing import Any

from chatsmith.errors import ChatsmithError

EXPECTED_WORLD = "CHATSMITH_EXPECTED_WORLD"   # set for the launched processes: how many were asked for
FLAGS = {"--num-processes": "num_processes", "--num-machines": "num_machines", "--machine-rank": "machine_rank",
         "--main-process-ip": "main_process_ip", "--main-process-port": "main_process_port",
         "--accelerate-config": "accelerate_config"}


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The launch flags of a training stage."""
    g = parser.add_argument_group("several processes (a shortcut for `accelerate launch`)")
    g.add_argument("--num-processes", type=int, default=1,
                   help="processes in all (all machines together); > 1 launches them through accelerate [default: 1]")
    g.add_argument("--num-machines", type=int, default=1, help="machines taking part [default: 1]")
    g.add_argument("--machine-rank", type=int, default=0, help="this machine's index, 0 on the main one [default: 0]")
    g.add_argument("--main-process-ip", default=None, help="address of machine 0 (several machines)")
    g.add_argument("--main-process-port", type=int, default=None, help="its port [default: a free port on one "
                   "machine, 29500 on several]")
    g.add_argument("--accelerate-config", default=None,
                   help="an accelerate config file (recipes/accelerate/*.yaml: ddp, fsdp, fsdp_offload, zero2, zero3)")


def strip_launch_flags(argv: list[str]) -> list[str]:
    """argv without the launch flags (`--flag value` or `--flag=value`)."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok in FLAGS:
            skip = True
            continue
        if tok.split("=", 1)[0] in FLAGS and "=" in tok:
            continue
        out.append(tok)
    return out


def launch_command(args: argparse.Namespace, argv: list[str]) -> list[str] | None:
    """The `accelerate launch` command that runs this stage command on `--num-processes`
    processes, or None when it runs right here (one process, or already launched)."""
    n, machines = args.num_processes, args.num_machines
    if os.environ.get(EXPECTED_WORLD) or (n <= 1 and machines <= 1 and not args.accelerate_config):
        return None
    if n < machines:
        raise ChatsmithError(f"--num-processes {n} is fewer than --num-machines {machines}: --num-processes counts "
                             "the processes of all machines together")
    if machines > 1 and not args.main_process_ip:
        raise ChatsmithError("--num-machines > 1 needs --main-process-ip (the address of machine 0, "
                             "reachable from every machine)")
    port = args.main_process_port or (29500 if machines > 1 else _free_port())
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if args.accelerate_config:
        if not os.path.isfile(args.accelerate_config):
            raise ChatsmithError(f"--accelerate-config {args.accelerate_config}: no such file (see recipes/accelerate/)")
        cmd += ["--config_file", args.accelerate_config]
    else:
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--num_processes", str(n), "--num_machines", str(machines), "--machine_rank", str(args.machine_rank),
            "--main_process_port", str(port)]
    if args.main_process_ip:
        cmd += ["--main_process_ip", args.main_process_ip]
    return [*cmd, "-m", "chatsmith", *strip_launch_flags(argv)]


def launch(args: argparse.Namespace, argv: list[str]) -> int | None:
    """Run the stage on several processes when asked (returns their exit status), else None."""
    cmd = launch_command(args, argv)
    if cmd is None:
        return None
    env = {**os.environ, EXPECTED_WORLD: str(args.num_processes)}
    local = max(1, args.num_processes // max(1, args.num_machines))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local)))   # no oversubscribed cores
    print(f"launching {args.num_processes} processes: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    return subprocess.run(cmd, env=env).returncode


def check_world(accelerator: Any) -> None:
    """Fail loudly when the processes accelerate started are not as many as were asked for."""
    asked = os.environ.get(EXPECTED_WORLD) or os.environ.get("WORLD_SIZE")
    if asked and int(asked) != accelerator.num_processes:
        raise ChatsmithError(
            f"asked for {asked} processes but this process sees {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type}); `accelerate launch --cpu --num_processes N` starts "
            "one process (huggingface/accelerate#2741): use --multi_gpu (gloo on a CPU) or "
            "`chatsmith ... --num-processes N`")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_launched_process(status: int | None) -> None:
    """End a process that a launcher started (WORLD_SIZE > 1) with `status`, now that its stage has
    returned: its files are written and closed, its process group destroyed (Accelerator.end_training).
    The exit skips the interpreter's finalization, where C++ threads of torch.distributed can still
    run while objects are torn down: a gloo process that reaches exit with a process group alive
    aborts with "terminate called without an active exception" (pytorch/pytorch#190489), and FSDP2's
    device mesh keeps its groups alive after destroy_process_group (DeviceMesh._pg_registry). CI saw
    that abort once on rank 1 of a 2-process FSDP run, after training. A no-op in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)
