"""The telemetry alone (trainer.observability.telemetry): the loop's notes in, one record out.

The host clock is replaced by one the test moves, so every share of the interval's time is known
exactly: each step spends 1 s fetching its batch, 2 s computing, 0.5 s in the optimizer step and
0.25 s elsewhere (hooks, the step boundary)."""

import pytest
import torch

from trainer.loop.nonfinite import NonFiniteGuard
from trainer.observability import telemetry as telemetry_module
from trainer.observability.telemetry import Telemetry
from trainer.observability.timing import StepTimes

CPU = torch.device("cpu")
DATA, COMPUTE, OPTIMIZER, OTHER = 1.0, 2.0, 0.5, 0.25
STEP = DATA + COMPUTE + OPTIMIZER + OTHER


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(telemetry_module, "perf_counter", lambda: now[0])
    return now


def parts(lr=0.1):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    guard = NonFiniteGuard("skip", 3, [optimizer], CPU, fp16=False)
    guard.start(0, 10)
    telemetry = Telemetry.for_run(CPU, StepTimes(CPU, None, None), guard, [optimizer])
    return telemetry, guard


def run_steps(telemetry, guard, clock, losses, batch_sizes, first=1, move=None, skip=()):
    """One micro-batch per step, through the calls the training loop makes."""

    def source():
        for size in batch_sizes:
            clock[0] += DATA
            yield (torch.zeros(size, 3), torch.zeros(size))

    seen = []
    for step, (batch, loss) in enumerate(zip(telemetry.batches(source(), move), losses), start=first):
        seen.append(batch)
        clock[0] += COMPUTE
        loss = torch.tensor(loss)
        telemetry.computed(batch, loss, loss)
        clock[0] += OPTIMIZER
        step_loss, count = telemetry.step_loss()
        assert count is None and step_loss.item() == loss.item()
        skipped = step in skip or guard.check(step_loss, None, step, step_loss)
        telemetry.stepped(skipped, step)
        clock[0] += OTHER
    return seen


def test_a_record_holds_the_interval_s_loss_throughput_and_the_exact_shares_of_its_time(clock):
    telemetry, guard = parts()
    telemetry.start(0, time_first_step=False)
    run_steps(telemetry, guard, clock, [1.0, 2.0, 6.0, 3.0], [4, 4, 4, 2])
    telemetry.log("custom", torch.tensor(7.0))
    record = telemetry.record(4, 0)
    assert record["step"] == 4 and record["epoch"] == 0
    assert record["train/loss"] == 3.0 and record["custom"] == 7.0 and record["lr"] == 0.1
    assert record["samples_per_sec"] == pytest.approx(14 / (4 * STEP))  # each batch at its own size
    assert record["time/step_s"] == pytest.approx(STEP)
    expected = {"time/data": DATA / STEP, "time/compute": COMPUTE / STEP, "time/optimizer": OPTIMIZER / STEP,
                "time/other": OTHER / STEP}
    assert {k: record[k] for k in expected} == pytest.approx(expected)

    # The next interval starts from zero: nothing happened, no record; then only its own steps count.
    assert telemetry.record(4, 0) is None
    clock[0] += 10.0  # a long evaluation between the intervals counts as "other" of the next one
    run_steps(telemetry, guard, clock, [5.0], [4], first=5)
    record = telemetry.record(5, 0)
    assert record["train/loss"] == 5.0 and record["time/step_s"] == pytest.approx(STEP + 10.0)
    assert record["time/data"] == pytest.approx(DATA / (STEP + 10.0))


def test_a_skipped_step_is_left_out_of_the_loss_and_an_interval_of_skipped_steps_logs_none(clock):
    telemetry, guard = parts()
    telemetry.start(0, time_first_step=False)
    run_steps(telemetry, guard, clock, [1.0, 100.0, 3.0], [4, 4, 4], skip={2})
    assert telemetry.record(3, 0)["train/loss"] == 2.0
    run_steps(telemetry, guard, clock, [100.0], [4], first=4, skip={4})
    record = telemetry.record(4, 0)
    assert "train/loss" not in record and record["time/step_s"] == pytest.approx(STEP)


def test_a_first_step_timed_alone_is_left_out_of_throughput_and_time_shares(clock):
    telemetry, guard = parts()
    started = []
    telemetry.register(on_first_step=lambda: started.append(clock[0]))
    telemetry.start(0, time_first_step=True)
    clock[0] += 30.0  # compilation, inside the first step
    run_steps(telemetry, guard, clock, [1.0, 2.0, 3.0], [4, 4, 4])
    assert len(started) == 1
    record = telemetry.record(3, 0)
    assert record["time/first_step_s"] == pytest.approx(30.0 + STEP - OTHER)  # it ends when it has stepped
    # The interval starts where the first step stepped: steps 2 and 3, and what followed step 1.
    assert record["time/step_s"] == pytest.approx((2 * STEP + OTHER) / 2)
    assert record["samples_per_sec"] == pytest.approx(8 / (2 * STEP + OTHER))
    assert record["train/loss"] == 2.0  # the loss of every step, the first one's too


def test_batches_are_moved_by_the_given_function_and_the_move_counts_as_data(clock):
    telemetry, guard = parts()
    telemetry.start(0, time_first_step=False)

    def move(batch):
        clock[0] += 0.75
        return tuple(t + 1 for t in batch)

    seen = run_steps(telemetry, guard, clock, [1.0, 1.0], [2, 2], move=move)
    assert all(torch.equal(x, torch.ones(2, 3)) for x, _ in seen)
    record = telemetry.record(2, 0)
    assert record["time/data"] == pytest.approx((DATA + 0.75) / (STEP + 0.75))
