"""Several processes: torchrun's process group (``distributed``), SLURM's requeue and srun's tasks
(``slurm``), and the strategies that wrap the model for one process, DDP or FSDP (``strategy``)."""
