"""Several processes: torchrun's process group (``distributed``) and the strategies that wrap the
model for one process, DDP or FSDP (``strategy``)."""
