"""Starting the processes of a multi-GPU run from the command line, and joining their process group.

``inference_cli.py --gpus N`` re-runs itself under ``torch.distributed.run`` (torchrun) with N processes on
this machine; a command started by torchrun directly (``torchrun --nproc_per_node N inference_cli.py ...``)
is recognised from the variables torchrun sets.  Each process uses the GPU of its local rank; NCCL joins
GPUs, gloo CPU processes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchInfo:
    """What torchrun told this process."""

    rank: int
    world: int
    local_rank: int


def from_environment(environ=os.environ) -> LaunchInfo | None:
    """This process's place in a torchrun launch, or None when it was started on its own."""
    if not all(name in environ for name in TORCHRUN_VARIABLES):
        return None
    try:
        info = LaunchInfo(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]))
    except ValueError as exc:
        raise RuntimeError(f"torchrun's RANK / WORLD_SIZE / LOCAL_RANK are not integers: {exc}") from exc
    if not 0 <= info.rank < info.world:
        raise RuntimeError(f"RANK {info.rank} is outside WORLD_SIZE {info.world}")
    return info


def torchrun_command(gpus: int, argv: list[str]) -> list[str]:
    """The command that runs this script again as ``gpus`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *argv]


def relaunch(gpus: int, argv: list[str]) -> int:
    """Run ``argv`` (script and arguments) under torchrun with ``gpus`` processes; returns its exit code."""
    import torch

    available = torch.cuda.device_count()
    if gpus > available:
        raise RuntimeError(f"--gpus {gpus} asks for more GPUs than this machine has ({available}).")
    return subprocess.call(torchrun_command(gpus, argv))


def join(info: LaunchInfo) -> str:
    """Join the run's process group; returns this process's device ("cuda:<local rank>" or "cpu")."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", info.local_rank))
        return f"cuda:{info.local_rank}"
    dist.init_process_group("gloo")
    return "cpu"


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
