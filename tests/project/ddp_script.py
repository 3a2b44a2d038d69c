"""A user's own script, launched by torchrun, that trains with DDP and ends with ``trainer.close()``.

It records whether the DDP wrapper was gone when the process group was destroyed: destroyed from
DDP's reducer (the GIL held), the group can deadlock with a gloo thread that needs the GIL to free
the last collective's tensors, and the process never exits. ``compile`` as the argument compiles
the DDP model, whose compiled code holds the wrapper as well.
"""

import sys
import weakref

import torch
import torch.distributed as dist
from torch.nn import functional as F

from trainer import Trainer
from lines import say


def main(mode: str = "eager") -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(8, 2)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), loss_fn=F.cross_entropy,
                      config={"max_steps": 4, "batch_size": 8, "log_every_n_steps": 2, "progress": "off",
                              "compile": mode == "compile"})
    trainer.fit()
    wrapper = weakref.ref(trainer.strategy.ddp)
    destroy, gone = dist.destroy_process_group, []

    def recording_destroy(*args, **kwargs):
        gone.append(wrapper() is None)
        destroy(*args, **kwargs)

    dist.destroy_process_group = recording_destroy
    trainer.close()
    trainer.close()  # a second call has nothing left to do
    say(f"rank {trainer.layout.rank}: wrapper gone at destroy {gone}, initialized {dist.is_initialized()}")


if __name__ == "__main__":
    main(*sys.argv[1:])
