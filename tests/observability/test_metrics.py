"""trainer/metrics.py: the metric buffer, the JSONL and CSV loggers, and truncating them on resume."""

import csv
import io
import json
import math
import os
import random
import signal
import time
from unittest import mock

import pytest
import torch

from trainer.observability.metrics import CsvLogger, JsonlLogger, MetricBuffer, truncate_metrics
from trainer.run_dir import METRICS_CSV, METRICS_JSONL


def read_csv(path):
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# MetricBuffer


def test_buffer_is_empty_until_a_value_is_put_and_after_a_flush():
    buf = MetricBuffer()
    assert not buf
    buf.put("loss", torch.tensor(1.0))
    assert buf
    buf.flush()
    assert not buf
    assert buf.flush() == ({}, None)


def test_buffer_keeps_tensors_detached_and_unconverted_until_flush():
    w = torch.tensor(2.0, requires_grad=True)
    loss = w * 3
    buf = MetricBuffer()
    with mock.patch.object(torch.Tensor, "item", side_effect=AssertionError("item() before flush")), \
         mock.patch.object(torch.Tensor, "tolist", side_effect=AssertionError("tolist() before flush")):
        buf.put("loss", loss)
    kept = buf._pending["loss"]
    assert isinstance(kept, torch.Tensor)  # still a tensor: no device-to-host copy yet
    assert not kept.requires_grad  # detached: the autograd graph is not kept alive
    assert kept.data_ptr() == loss.data_ptr()  # not copied


def test_flush_converts_everything_with_one_tolist_and_no_item():
    buf = MetricBuffer()
    buf.put("loss", torch.tensor(0.25))
    buf.put("acc", torch.tensor([0.5, 1.0]))  # a vector is logged as its mean
    buf.put("lr", 0.1)  # plain numbers pass through
    buf.put("step_count", 7)
    conversions = []
    tolist = torch.Tensor.tolist

    def counting_tolist(self):
        conversions.append(self.shape)
        return tolist(self)

    with mock.patch.object(torch.Tensor, "tolist", counting_tolist), \
         mock.patch.object(torch.Tensor, "item", side_effect=AssertionError("item() in flush")):
        record, extra = buf.flush(extra=torch.tensor([3.0, 4.0]))
    assert conversions == [(4,)]  # loss, acc and the two extra values in one copy
    assert record == {"loss": 0.25, "acc": 0.75, "lr": 0.1, "step_count": 7.0}
    assert all(type(v) is float for v in record.values())
    assert extra == [3.0, 4.0]  # extra comes back separately, not in the record


def test_flush_without_extra_returns_none_and_with_only_extra_returns_it():
    buf = MetricBuffer()
    buf.put("loss", torch.tensor(2.0))
    assert buf.flush() == ({"loss": 2.0}, None)
    buf.put("lr", 0.5)
    assert buf.flush(extra=torch.tensor([1.5])) == ({"lr": 0.5}, [1.5])


def test_the_last_put_of_a_name_wins():
    buf = MetricBuffer()
    buf.put("loss", torch.tensor(1.0))
    buf.put("loss", torch.tensor(2.0))
    assert buf.flush()[0] == {"loss": 2.0}


def test_flush_applies_reduce_to_tensor_values_in_name_order():
    seen = []

    def reduce(joined):
        seen.append(joined.clone())
        return joined * 10

    buf = MetricBuffer()
    buf.put("b", torch.tensor(2.0))
    buf.put("a", torch.tensor(1.0))
    buf.put("lr", 0.5)  # not a tensor: not reduced
    record, extra = buf.flush(extra=torch.tensor([3.0]), reduce=reduce)
    assert len(seen) == 1
    assert seen[0].tolist() == [1.0, 2.0, 3.0]  # a before b, whatever order they were put in; extra last
    assert seen[0].dtype == torch.float64
    assert record == {"a": 10.0, "b": 20.0, "lr": 0.5}
    assert extra == [30.0]


def test_flush_keeps_float64_precision_for_float32_inputs():
    buf = MetricBuffer()
    value = torch.tensor(0.1, dtype=torch.float32)
    buf.put("x", value)
    assert buf.flush()[0]["x"] == float(value.double())


# JsonlLogger


def test_jsonl_writes_one_object_per_record_and_nonfinite_values_as_strings(tmp_path):
    path = tmp_path / METRICS_JSONL
    log = JsonlLogger(path)
    log.log({"step": 1, "loss": 0.5})
    log.log({"step": 2, "loss": math.nan, "grad_norm": math.inf, "low": -math.inf})
    lines = path.read_text(encoding="utf-8").splitlines()  # flushed: readable before close
    log.close()
    assert len(lines) == 2
    # strict JSON: a bare NaN/Infinity token would not parse
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    assert strict[0] == {"step": 1, "loss": 0.5}
    assert strict[1] == {"step": 2, "loss": "nan", "grad_norm": "inf", "low": "-inf"}
    assert float(strict[1]["loss"]) != float(strict[1]["loss"])  # the strings read back as the values
    assert float(strict[1]["grad_norm"]) == math.inf


def test_jsonl_appends_across_instances(tmp_path):
    path = tmp_path / METRICS_JSONL
    first = JsonlLogger(path)
    first.log({"step": 1, "loss": 1.0})
    first.close()
    second = JsonlLogger(path)
    second.log({"step": 2, "loss": 0.5})
    second.close()
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


# CsvLogger


def test_csv_writes_a_header_then_appends_rows(tmp_path):
    path = tmp_path / METRICS_CSV
    log = CsvLogger(path)
    log.log({"step": 1, "loss": 1.0})
    log.log({"step": 2, "loss": 0.5})
    log.close()
    columns, rows = read_csv(path)
    assert columns == ["step", "loss"]
    assert rows == [{"step": "1", "loss": "1.0"}, {"step": "2", "loss": "0.5"}]


def test_csv_rewrites_the_header_for_a_new_column_and_keeps_old_rows(tmp_path):
    path = tmp_path / METRICS_CSV
    log = CsvLogger(path)
    log.log({"step": 1, "loss": 1.0})
    log.log({"step": 2, "loss": 0.5, "val/loss": 0.7})
    log.log({"step": 3, "loss": 0.25})  # a row without the new column
    columns, rows = read_csv(path)
    assert columns == ["step", "loss", "val/loss"]
    assert rows == [
        {"step": "1", "loss": "1.0", "val/loss": ""},
        {"step": "2", "loss": "0.5", "val/loss": "0.7"},
        {"step": "3", "loss": "0.25", "val/loss": ""},
    ]
    assert path.read_text(encoding="utf-8").count("step") == 1  # one header, not one per rewrite


def test_csv_reopens_an_existing_file_and_keeps_its_rows_and_columns(tmp_path):
    path = tmp_path / METRICS_CSV
    first = CsvLogger(path)
    first.log({"step": 1, "loss": 1.0})
    first.log({"step": 2, "loss": 0.5, "val/loss": 0.7})
    first.close()

    second = CsvLogger(path)
    assert second.columns == ["step", "loss", "val/loss"]
    second.log({"step": 3, "loss": 0.25})  # known columns: appended
    second.log({"step": 4, "loss": 0.125, "lr": 0.01})  # a new column: rewritten with the old rows
    second.close()
    columns, rows = read_csv(path)
    assert columns == ["step", "loss", "val/loss", "lr"]
    assert rows == [
        {"step": "1", "loss": "1.0", "val/loss": "", "lr": ""},
        {"step": "2", "loss": "0.5", "val/loss": "0.7", "lr": ""},
        {"step": "3", "loss": "0.25", "val/loss": "", "lr": ""},
        {"step": "4", "loss": "0.125", "val/loss": "", "lr": "0.01"},
    ]


def test_csv_treats_an_empty_existing_file_as_new(tmp_path):
    path = tmp_path / METRICS_CSV
    path.write_text("", encoding="utf-8")
    log = CsvLogger(path)
    log.log({"step": 1, "loss": 1.0})
    assert read_csv(path) == (["step", "loss"], [{"step": "1", "loss": "1.0"}])


# truncate_metrics


def write_both(run_dir, steps):
    jsonl, table = JsonlLogger(run_dir / METRICS_JSONL), CsvLogger(run_dir / METRICS_CSV)
    for step in steps:
        record = {"step": step, "epoch": 0, "loss": 1.0 / step}
        if step % 2 == 0:
            record["val/loss"] = 2.0 / step
        jsonl.log(record)
        table.log(record)
    jsonl.close()
    table.close()


def test_truncate_drops_records_after_the_step_in_both_files(tmp_path):
    write_both(tmp_path, range(1, 7))
    truncate_metrics(tmp_path, 3)
    records = [json.loads(line) for line in (tmp_path / METRICS_JSONL).read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1] == {"step": 2, "epoch": 0, "loss": 0.5, "val/loss": 1.0}
    columns, rows = read_csv(tmp_path / METRICS_CSV)
    assert columns == ["step", "epoch", "loss", "val/loss"]  # columns kept, even those of dropped rows
    assert [row["step"] for row in rows] == ["1", "2", "3"]
    assert rows[1]["val/loss"] == "1.0"


def test_truncate_then_log_continues_both_files(tmp_path):
    write_both(tmp_path, range(1, 5))
    truncate_metrics(tmp_path, 2)
    write_both(tmp_path, [3])
    records = [json.loads(line) for line in (tmp_path / METRICS_JSONL).read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [row["step"] for row in read_csv(tmp_path / METRICS_CSV)[1]] == ["1", "2", "3"]


def test_truncate_tolerates_a_cut_off_last_line(tmp_path):
    write_both(tmp_path, range(1, 4))
    jsonl, table = tmp_path / METRICS_JSONL, tmp_path / METRICS_CSV
    with jsonl.open("a", encoding="utf-8") as f:
        f.write('{"step": 4, "epoch": 0, "lo')  # a crash mid-write
    with table.open("a", encoding="utf-8") as f:
        f.write("4,0,0.2")  # a crash mid-row: the last columns are missing, no newline
    truncate_metrics(tmp_path, 10)
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert jsonl.read_text(encoding="utf-8").endswith("}\n")  # the next record starts on its own line
    rows = read_csv(table)[1]
    assert [row["step"] for row in rows] == ["1", "2", "3"]  # the cut-off row is gone, not kept half-empty
    assert table.read_text(encoding="utf-8").endswith("\n")


def test_truncate_tolerates_missing_files(tmp_path):
    truncate_metrics(tmp_path, 5)
    assert list(tmp_path.iterdir()) == []


def test_truncate_drops_a_csv_row_cut_off_inside_its_step(tmp_path):
    write_both(tmp_path, range(1, 12))
    with (tmp_path / METRICS_CSV).open("a", encoding="utf-8") as f:
        f.write("1")  # the row of step 12, cut off after its first digit
    truncate_metrics(tmp_path, 10)  # resuming from the checkpoint of step 10
    steps = [row["step"] for row in read_csv(tmp_path / METRICS_CSV)[1]]
    assert steps == [str(s) for s in range(1, 11)]


@pytest.mark.parametrize("tail", [
    "4,0,0.2",  # cut after the step: columns missing
    "4,0,0.25,0.",  # every column there, the last number cut: only the missing newline tells
])
def test_truncate_drops_a_csv_row_without_its_newline(tmp_path, tail):
    write_both(tmp_path, range(1, 4))
    with (tmp_path / METRICS_CSV).open("a", encoding="utf-8") as f:
        f.write(tail)
    truncate_metrics(tmp_path, 10)
    columns, rows = read_csv(tmp_path / METRICS_CSV)
    assert columns == ["step", "epoch", "loss", "val/loss"]
    assert [row["step"] for row in rows] == ["1", "2", "3"]


def test_truncate_drops_a_csv_row_with_fewer_fields_than_the_header(tmp_path):
    write_both(tmp_path, range(1, 3))
    with (tmp_path / METRICS_CSV).open("a", newline="", encoding="utf-8") as f:
        f.write("3,0\r\n4,0,0.25,0.5\r\n")
    truncate_metrics(tmp_path, 10)
    assert [row["step"] for row in read_csv(tmp_path / METRICS_CSV)[1]] == ["1", "2", "4"]


def test_truncate_keeps_a_whole_jsonl_record_that_lacks_only_its_newline(tmp_path):
    write_both(tmp_path, range(1, 3))
    jsonl = tmp_path / METRICS_JSONL
    with jsonl.open("a", encoding="utf-8") as f:
        f.write('{"step": 3, "loss": 0.5}')  # a JSON object cannot be cut and still parse: it is whole
    truncate_metrics(tmp_path, 10)
    assert jsonl.read_text(encoding="utf-8").splitlines()[-1] == '{"step": 3, "loss": 0.5}'
    assert jsonl.read_text(encoding="utf-8").endswith("}\n")


def test_truncate_leaves_files_with_nothing_to_drop_as_they_are(tmp_path):
    write_both(tmp_path, range(1, 4))
    files = [tmp_path / METRICS_JSONL, tmp_path / METRICS_CSV]
    before = [(p.stat().st_ino, p.read_bytes()) for p in files]
    truncate_metrics(tmp_path, 3)
    assert [(p.stat().st_ino, p.read_bytes()) for p in files] == before  # not rewritten: no crash window


# Files left by a crash


def test_jsonl_starts_a_new_line_after_a_cut_off_one(tmp_path):
    path = tmp_path / METRICS_JSONL
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo', encoding="utf-8")
    log = JsonlLogger(path)
    log.log({"step": 2, "loss": 0.5})
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == ['{"step": 1, "loss": 1.0}', '{"step": 2, "lo', '{"step": 2, "loss": 0.5}']
    truncate_metrics(tmp_path, 10)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


def test_jsonl_adds_nothing_to_a_file_that_ends_with_a_newline(tmp_path):
    path = tmp_path / METRICS_JSONL
    path.write_text('{"step": 1}\n', encoding="utf-8")
    JsonlLogger(path).close()
    assert path.read_text(encoding="utf-8") == '{"step": 1}\n'


def test_csv_drops_a_cut_off_row_instead_of_appending_to_it(tmp_path):
    path = tmp_path / METRICS_CSV
    write_both(tmp_path, range(1, 4))
    with path.open("a", encoding="utf-8") as f:
        f.write("1")  # step 12 of an earlier process, cut off: the next row would read "14,..."
    log = CsvLogger(path)
    log.log({"step": 4, "epoch": 0, "loss": 0.25})
    columns, rows = read_csv(path)
    assert columns == ["step", "epoch", "loss", "val/loss"]
    assert [row["step"] for row in rows] == ["1", "2", "3", "4"]
    log.log({"step": 5, "epoch": 0, "loss": 0.2})  # the file is whole again: appended
    assert [row["step"] for row in read_csv(path)[1]] == ["1", "2", "3", "4", "5"]


# Rewrites killed at random moments


ROWS = 2_000  # about 80 kB a file: a rewrite takes long enough for kills to land inside it
FILES = (METRICS_JSONL, METRICS_CSV)


def write_large_run(run_dir):
    """Both metric files as the loggers write them, for steps 1..ROWS (written in one go: a logger
    call per row would take longer than the test)."""
    records = [{"step": step, "epoch": step // 1000, "train/loss": 1.0 / step, "lr": 1e-3 * (step % 7)}
               for step in range(1, ROWS + 1)]
    for record in records[::10]:
        record["val/loss"] = 2.0 / record["step"]
    (run_dir / METRICS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["step", "epoch", "train/loss", "lr", "val/loss"])
    writer.writeheader()
    writer.writerows(records)
    with (run_dir / METRICS_CSV).open("w", newline="", encoding="utf-8") as f:
        f.write(table.getvalue())


def run_child(folder, action, kill_after=None):
    """Run ``action`` in a forked child process (it starts at once: torch is already imported), and
    SIGKILL it ``kill_after`` seconds after the fork, or let it finish (None). Returns whether the
    kill stopped it before it finished, and the seconds it ran. Timed from the fork, not from its
    first write as seen by polling: on a loaded machine the parent may not look before the child is done."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            action()
            code = 0
        finally:
            os._exit(code)
    start = time.perf_counter()
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)  # a child that already exited is a zombie until reaped: no error
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, "the rewrite failed in the child"
    return os.WIFSIGNALED(status), time.perf_counter() - start


def attack(folder, action, tries=30):
    """Run ``action`` once to completion (the new content, and how long its writes take), then
    ``tries`` times from the old content, each time killed after a random delay within that time. After every kill each file must hold its old content or its new content,
    byte for byte: never a file cut off part-way, nor one missing rows it had."""
    paths = [folder / name for name in FILES]
    old = [p.read_bytes() for p in paths]
    killed, writing = run_child(folder, action)
    assert not killed
    new = [p.read_bytes() for p in paths]
    rng = random.Random(0)
    kills = 0
    for attempt in range(tries):
        for p, content in zip(paths, old):
            p.write_bytes(content)
        for leftover in folder.glob(".metrics*.tmp-*"):  # a killed child's temp file: never read as metrics
            leftover.unlink()
        kills += run_child(folder, action, kill_after=rng.uniform(0, writing))[0]
        for p, before, after in zip(paths, old, new):
            content = p.read_bytes()
            lines = [c.count(b"\n") for c in (content, before, after)]
            assert content in (before, after), (
                f"try {attempt}: {p.name} holds neither the old nor the new content: {lines[0]} lines "
                f"(old {lines[1]}, new {lines[2]})"
            )
    assert kills, "every child finished before its kill: the test attacked nothing"
    return old, new


@pytest.mark.slow
def test_a_truncate_killed_at_random_moments_leaves_each_file_old_or_new(tmp_path):
    write_large_run(tmp_path)
    old, new = attack(tmp_path, lambda: truncate_metrics(tmp_path, ROWS - 100))  # a resume drops the last few
    assert all(before != after for before, after in zip(old, new))  # both files are rewritten
    assert json.loads(new[0].splitlines()[-1])["step"] == ROWS - 100


@pytest.mark.slow
def test_a_new_csv_column_killed_at_random_moments_leaves_the_old_table_or_the_new(tmp_path):
    write_large_run(tmp_path)

    def log_a_new_column():
        CsvLogger(tmp_path / METRICS_CSV).log({"step": ROWS + 1, "epoch": 99, "train/loss": 0.5, "grad_norm/total": 1.5})

    old, new = attack(tmp_path, log_a_new_column)
    reader = csv.DictReader(io.StringIO(new[1].decode("utf-8"), newline=""))
    columns, rows = reader.fieldnames, list(reader)
    assert columns == ["step", "epoch", "train/loss", "lr", "val/loss", "grad_norm/total"]
    assert len(rows) == ROWS + 1 and rows[-1]["grad_norm/total"] == "1.5"


def test_a_log_interval_regrouped_for_other_ranks_logs_what_the_uninterrupted_run_logs():
    """Two ranks, one micro-batch a step, two steps into the interval, then one process with two
    micro-batches a step (the same global batch): the interval's train/loss at the next log point is
    the mean the two ranks would have logged."""
    from trainer.checkpoint import BatchLayout
    from trainer.observability.metrics import LogInterval

    saved = {"loss_sums": [1.0 + 2.0, 3.0 + 4.0], "loss_count": 2, "summed": False, "item_count": 0.0,
             "micro_batches": 2, "extra_sums": [{"acc": 1.0}, {"acc": 0.5}], "extra_types": {"acc": "float"},
             "extra_count": 2}
    # step 3 on two ranks: rank 0 sees micro-batch means 5, rank 1 sees 7
    uninterrupted = ((saved["loss_sums"][0] + 5.0) / 3 + (saved["loss_sums"][1] + 7.0) / 3) / 2
    state = LogInterval.regroup(saved, BatchLayout(8, 1, 2), BatchLayout(8, 2, 1))
    assert state["loss_sums"] == [10.0] and state["loss_count"] == 4 and state["extra_count"] == 4
    assert state["extra_sums"] == [{"acc": 1.5}]
    interval = LogInterval(torch.device("cpu"))
    interval.load_state_dict(state)
    for mean in (5.0, 7.0):  # step 3 in one process: both micro-batches
        interval.track(torch.tensor(mean), None, torch.zeros(8))
    interval.end_step(False)
    assert (interval.loss_sum / interval.loss_count).item() == pytest.approx(uninterrupted)
    # and back: one process to two ranks halves the micro-batches a step; summed losses share the sum out
    back = LogInterval.regroup(state, BatchLayout(8, 2, 1), BatchLayout(8, 1, 2))
    assert back["loss_sums"] == [5.0, 5.0] and back["loss_count"] == 2
    summed = LogInterval.regroup({**saved, "summed": True, "item_count": 40.0}, BatchLayout(8, 1, 2),
                                 BatchLayout(8, 2, 1))
    assert summed["loss_sums"] == [10.0] and summed["item_count"] == 40.0


def test_every_value_of_a_log_point_is_a_float_whatever_its_tensor_dtype():
    # On the CPU each value is read on its own; an integer or bool tensor still logs as a float,
    # as it does on a GPU (one float64 copy), so metric files read the same on either.
    buffer = MetricBuffer()
    buffer.put("count", torch.tensor(3))
    buffer.put("flag", torch.tensor(True))
    buffer.put("half", torch.tensor(0.5, dtype=torch.bfloat16))
    record, _ = buffer.flush()
    assert record == {"count": 3.0, "flag": 1.0, "half": 0.5}
    assert {type(v) for v in record.values()} == {float}


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 5])
def test_a_log_interval_resumed_at_any_step_logs_bit_for_bit_what_the_uninterrupted_one_logs(cut):
    """A checkpoint taken after ``cut`` of the interval's steps holds its loss sum exactly, and the
    resumed interval goes on adding in the same order and precision: 2**24 + 1 is 2**24 in float32, so
    a sum carried on in float64, or grouped otherwise, ends elsewhere."""
    from trainer.observability.metrics import LogInterval

    losses = [2.0**24, 1.0, -2.0**24, 3.0, 1e-7, 2.5]
    skipped = {4}  # a skipped step's loss is left out, before the cut or after it

    def steps(interval, values):
        for i, value in values:
            interval.track(torch.tensor(value), None, torch.zeros(2))
            interval.end_step(i in skipped)
        return interval

    def logged(interval):
        return (interval.loss_sum / interval.loss_count).item()

    whole = steps(LogInterval(torch.device("cpu")), enumerate(losses))
    first = steps(LogInterval(torch.device("cpu")), list(enumerate(losses))[:cut])
    resumed = LogInterval(torch.device("cpu"))
    resumed.load_state_dict(first.state_dict())
    steps(resumed, list(enumerate(losses))[cut:])
    assert logged(resumed) == logged(whole)
    assert resumed.micro_batches == whole.micro_batches == len(losses)
    assert resumed.loss_count == whole.loss_count == len(losses) - len(skipped)
