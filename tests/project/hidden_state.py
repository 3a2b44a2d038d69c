"""A model with state outside its state_dict, which a checkpoint therefore misses: what
``trainer verify-resume`` must find."""

from trainer.examples.models import MLP


class CountingMLP(MLP):
    """Scales its output by the number of forward calls so far, kept in a plain attribute: a resumed
    run counts from 0 again, and its losses part from the uninterrupted run's at its first step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x) * (1.0 + self.calls / 100)
