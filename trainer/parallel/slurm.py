"""SLURM, the way clusters start a run (torchrun, or srun alone, starts its processes).

Inside a job (``SLURM_JOB_ID`` set) the requeue signal (``sbatch --signal=USR1@90``) stops the run
like SIGTERM, at an optimizer-step boundary with a checkpoint, and rank 0 then requeues the job with
``scontrol requeue``; the job's script runs again and ``--resume auto`` continues. Outside a job the
signal keeps its default meaning.

Torch-free, like the config: ``trainer check`` reads the signal names without importing torch.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

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
