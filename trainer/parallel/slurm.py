"""SLURM, the way clusters start a run (torchrun, or srun alone, starts its processes).

Inside a job (``SLURM_JOB_ID`` set) the requeue signal (``sbatch --signal=USR1@90``) stops the run
like SIGTERM, at an optimizer-step boundary with a checkpoint, and rank 0 then requeues the job with
``scontrol requeue``; the job's script runs again and ``--resume auto`` continues. Outside a job the
signal keeps its default meaning.

``srun python -m trainer run ...`` without torchrun, one task a rank: each task gets the variables
torchrun would have set, from SLURM's (``as_torchrun``). Under ``srun torchrun`` torchrun's own win.

Torch-free, like the config: ``trainer check`` reads the signal names without importing torch.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping

# scontrol asks slurmctld, which answers in well under a second; a controller that does not answer
# in this long will not before SLURM's own SIGKILL.
SCONTROL_TIMEOUT_S = 30.0


class RequeueError(Exception):
    """The job could not be requeued: scontrol is missing, failed or did not answer."""


def job_id() -> str | None:
    """The SLURM job this process runs in, or None outside one."""
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_signal(name: str | None) -> int | None:
    """The signal number of ``slurm.requeue_signal`` inside a job; None outside one (or when it is off),
    so that no handler is installed and the signal keeps its default meaning."""
    if name is None or job_id() is None:
        return None
    return int(getattr(signal, f"SIG{name}"))


def requeue() -> None:
    """``scontrol requeue $SLURM_JOB_ID``. SLURM ends the job's processes once it accepts: everything
    the run must leave behind is written before this is called."""
    job = job_id()
    if job is None:
        raise RequeueError("SLURM_JOB_ID is not set, so there is no job to requeue")
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise RequeueError("scontrol was not found on PATH")
    try:
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RequeueError(f"scontrol requeue {job} did not answer within {SCONTROL_TIMEOUT_S:g} s") from None
    except OSError as exc:
        raise RequeueError(f"scontrol requeue {job} could not run: {exc.strerror or exc}") from None
    if done.returncode != 0:
        said = " ".join((done.stderr or done.stdout).split())[:300]
        raise RequeueError(f"scontrol requeue {job} exited {done.returncode}" + (f": {said}" if said else ""))


# MASTER_PORT when it is not set: one port per job, the same on every node, as Lightning derives it.
PORT_BASE = 15000


def as_torchrun(env: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for a task of a job step that srun
    started without torchrun: rank ``SLURM_PROCID`` of the step's ``SLURM_STEP_NUM_TASKS``, meeting on
    the step's first node (``MASTER_ADDR`` and ``MASTER_PORT`` where set). Nothing where torchrun's
    variables are set (``srun torchrun``), for a step of one task, or outside a step: the batch script
    itself has ``SLURM_PROCID`` and ``SLURM_NTASKS`` too, and a plain ``python -m trainer run`` there
    is one process."""
    if "RANK" in env or "WORLD_SIZE" in env or "SLURM_STEP_NUM_TASKS" not in env:
        return {}
    try:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        rank = int(env.get("SLURM_PROCID", "0"))
        local = int(env.get("SLURM_LOCALID", "0"))
    except ValueError as exc:
        raise ValueError(f"SLURM_STEP_NUM_TASKS, SLURM_PROCID and SLURM_LOCALID must be integers ({exc})") from None
    if world <= 1:
        return {}
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in env and not nodes:
        raise ValueError("srun started this task without torchrun and SLURM_STEP_NODELIST is not set: set "
                         "MASTER_ADDR to the host of rank 0")
    job = env.get("SLURM_JOB_ID", "")
    return {
        "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
        "MASTER_PORT": env.get("MASTER_PORT") or str(PORT_BASE + int(job) % 10000 if job.isdigit() else 29500),
    }


# One host of a node list: name parts, each range of numbers in brackets ("node[01-04,07]-ib").
_HOST = re.compile(r"[^,\[\]]+(?:\[[^\[\]]*\][^,\[\]]*)*")
_RANGES = re.compile(r"\[([^\]]*)\]")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, in its compressed form or not: ``node[01-04,07]`` is node01,
    ``gpu-a[3,5],gpu-b7`` gpu-a3, ``rack[1-2]-n[08-09]`` rack1-n08 (as ``scontrol show hostnames``
    lists them, where scontrol is there)."""
    found = _HOST.match(nodelist)
    if found is None or nodelist[found.end():][:1] not in ("", ","):
        raise ValueError(f"SLURM node list {nodelist!r} is not one SLURM writes (host, host[01-04,07], a,b); "
                         "set MASTER_ADDR to the host of rank 0")
    return _RANGES.sub(lambda ranges: ranges.group(1).split(",")[0].split("-")[0], found.group())
