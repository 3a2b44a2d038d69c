"""A loader that keeps its own position (torchdata's StatefulDataLoader) is checkpointed and
restored without reading a batch to get back; a plain DataLoader is read and skipped, loudly."""

import json
import signal
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from helpers import in_process, process_env, project_config
from trainer import Callback, Trainer
from trainer.checkpoint import list_checkpoints, load_checkpoint
from trainer.observability.timing import is_timing

pytest.importorskip("torchdata")
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402



class Counting(Dataset):
    """40 samples; counts the samples read (``__getitem__`` calls) in this process."""

    reads = 0

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        Counting.reads += 1
        return self.x[i], self.y[i]


class ReadsAtBatchStart(Callback):
    """The samples read so far, at each micro-batch's start."""

    def __init__(self):
        self.reads = []

    def on_train_batch_start(self, trainer, batch):
        self.reads.append(Counting.reads)


def fitted(run_dir, steps, loader_class=StatefulDataLoader, resume_from=None, generator=None, num_workers=0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
    if generator is not None:
        generator = torch.Generator().manual_seed(generator)
    loader = loader_class(Counting(), batch_size=4, shuffle=True, generator=generator,
                          num_workers=num_workers)  # 10 batches an epoch
    spy = ReadsAtBatchStart()
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), loader, loss_fn=F.cross_entropy,
                      callbacks=[spy], run_dir=run_dir,
                      config={"max_steps": steps, "log_every_n_steps": 2, "progress": "off",
                              "eval_every_n_epochs": None})
    Counting.reads = 0
    trainer.fit(resume_from=resume_from)
    return trainer, spy


def clockless(records):
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return fitted(tmp_path_factory.mktemp("whole"), 25)[0]


@pytest.mark.parametrize("stop", [6, 10, 14], ids=["mid-epoch", "epoch-end", "second-epoch"])
def test_a_stateful_loader_resumes_without_reading_and_equals_the_uninterrupted_run(uninterrupted, tmp_path, stop):
    fitted(tmp_path / "first", stop)
    checkpoint = list_checkpoints(tmp_path / "first" / "checkpoints")[-1]
    assert len(load_checkpoint(checkpoint)["trainer_state"]["loader_states"]) == 1  # one rank's state
    resumed, spy = fitted(tmp_path / "first", 25, resume_from=checkpoint)
    # The first micro-batch after the resume is the only one read so far: nothing was read to get back.
    assert spy.reads[:2] == [4, 8]
    assert all(torch.equal(a, b) for a, b in zip(resumed.module.parameters(), uninterrupted.module.parameters()))
    assert clockless(resumed.history) == clockless(r for r in uninterrupted.history if r["step"] > stop)


def test_a_loader_with_its_own_generator_resumes_bit_for_bit_into_the_next_epoch(tmp_path):
    """Making the restored iterator draws the loader's base seed from the loader's generator, which
    is its sampler's too; the next epoch's order comes from where the uninterrupted run left it."""
    whole, _ = fitted(tmp_path / "whole", 15, generator=1)
    fitted(tmp_path / "first", 6, generator=1)
    checkpoint = list_checkpoints(tmp_path / "first" / "checkpoints")[-1]
    resumed, spy = fitted(tmp_path / "first", 15, resume_from=checkpoint, generator=1)
    assert spy.reads[:2] == [4, 8]
    assert all(torch.equal(a, b) for a, b in zip(resumed.module.parameters(), whole.module.parameters()))
    assert clockless(resumed.history) == clockless(r for r in whole.history if r["step"] > 6)


def test_a_plain_dataloader_is_read_up_to_the_position_and_says_which_batches(tmp_path):
    fitted(tmp_path / "first", 6, loader_class=DataLoader)
    checkpoint = list_checkpoints(tmp_path / "first" / "checkpoints")[-1]
    with pytest.warns(UserWarning, match=r"resuming inside epoch 0 of a DataLoader .* discarding its batches 0-5 "
                                         r"\(6 batches\) to get back to batch 6"):
        _, spy = fitted(tmp_path / "first", 8, loader_class=DataLoader, resume_from=checkpoint)
    assert spy.reads[0] == 4 + 7 * 4  # the sanity pass's batch, the six skipped ones, the one it trains on


def test_a_checkpoint_without_the_loaders_state_falls_back_to_reading_loudly(tmp_path):
    fitted(tmp_path / "first", 6, loader_class=DataLoader)
    checkpoint = list_checkpoints(tmp_path / "first" / "checkpoints")[-1]
    with pytest.warns(UserWarning, match=r"holds no state of the training loader; resuming inside epoch 0 of a "
                                         r"StatefulDataLoader .* batches 0-5 \(6 batches\)"):
        _, spy = fitted(tmp_path / "first", 8, resume_from=checkpoint)
    assert spy.reads[0] == 7 * 4  # the six skipped batches, the one it trains on (the sanity pass reads none)


def test_a_checkpoint_from_another_number_of_ranks_reads_back_to_the_position_and_says_why(tmp_path):
    fitted(tmp_path / "first", 6)
    state = load_checkpoint(list_checkpoints(tmp_path / "first" / "checkpoints")[-1])
    state["trainer_state"]["loader_states"] *= 2  # as if two ranks had written it
    with pytest.warns(UserWarning, match=r"loader's position on 2 rank\(s\) and this run has 1, .*\(resume on 2 "
                                         r"rank\(s\) to restore it without reading\); resuming inside epoch 0 .* "
                                         r"batches 0-5 \(6 batches\)") as caught:
        _, spy = fitted(tmp_path / "first", 8, resume_from=state)
    assert len([w for w in caught if "resuming" in str(w.message)]) == 1  # said once
    assert spy.reads[0] == 7 * 4


def test_a_checkpoint_from_another_number_of_workers_reads_back_to_the_position_and_says_why(tmp_path):
    """torchdata's state has the shape of the worker count: another count is read back to, loudly."""
    fitted(tmp_path / "first", 6)
    checkpoint = list_checkpoints(tmp_path / "first" / "checkpoints")[-1]
    with pytest.warns(UserWarning, match=r"the checkpoint's training loader ran 0 worker\(s\) and this one runs 2, .*; "
                                         r"resuming inside epoch 0 .* batches 0-5 \(6 batches\)"):
        trainer, _ = fitted(tmp_path / "first", 8, resume_from=checkpoint, num_workers=2)
    assert trainer.global_step == 8


# The test project (helpers.PROJECT_CONFIG) reading its batches from a StatefulDataLoader that logs each
# index it reads (streams.logged_classification): 6 steps an epoch, three epochs, a checkpoint every 4.
CONFIG = project_config(
    name="s", out_dir="{out}", trainer="killers.NoisyTrainer", seed=3, max_steps=None, max_epochs=3, batch_size=None,
    checkpoint={"every_n_steps": 4, "keep_last": 10}, model={"hidden": 16, "dropout": 0.2},
    data={"_target_": "streams.logged_classification", "n_train": 48, "batch_size": 8},
    optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-2})


def run(cfg, reads, *args):
    """``trainer run`` as a real process, which the test kills."""
    env = process_env(READS_LOG=str(reads))
    return subprocess.run([sys.executable, "-m", "trainer", "run", str(cfg), *args], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_a_killed_run_of_a_stateful_loader_from_yaml_resumes_reading_only_what_is_left(tmp_path):
    """``trainer run`` with a data component that returns a StatefulDataLoader, killed by SIGKILL
    after step 9 (6 steps an epoch; the newest checkpoint is step 8's): the resumed process reads
    exactly the samples the uninterrupted run read after step 8, in the same order, and ends with
    the same weights and metric records."""
    whole = tmp_path / "whole"
    whole.mkdir()
    (whole / "cfg.yaml").write_text(CONFIG.replace("{out}", str(whole / "runs")))
    proc = in_process("run", whole / "cfg.yaml", env={"READS_LOG": whole / "reads"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    killed.mkdir()
    kill = (f"callbacks:\n  - {{_target_: killers.KillAt, where: after_step, step: 9, marker: '{killed / 'fired'}', "
            f"signum: {int(signal.SIGKILL)}}}\n")
    (killed / "cfg.yaml").write_text(CONFIG.replace("{out}", str(killed / "runs")) + kill)
    first = run(killed / "cfg.yaml", killed / "reads-first")
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    second = in_process("run", killed / "cfg.yaml", "--resume", "auto", env={"READS_LOG": killed / "reads"})
    assert second.returncode == 0, second.stderr[-3000:]

    reads = (whole / "reads").read_text().split()
    assert len(reads) == 3 * 48  # the uninterrupted run read every sample once an epoch, nothing more
    assert (killed / "reads").read_text().split() == reads[8 * 8:]

    def records(run_dir):
        return clockless(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())

    assert records(killed / "runs" / "s") == records(whole / "runs" / "s")
    a = load_checkpoint(list_checkpoints(killed / "runs" / "s" / "checkpoints")[-1])
    b = load_checkpoint(list_checkpoints(whole / "runs" / "s" / "checkpoints")[-1])
    assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())
