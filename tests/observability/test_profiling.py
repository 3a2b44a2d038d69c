"""``profile:`` (trainer.profiling): a torch.profiler trace of the configured steps, and the memory
snapshot written on out-of-memory."""

import json

import pytest
import torch
from torch.nn import functional as F

from helpers import classification, mlp, quiet
from trainer import Trainer
from trainer.observability import profiling


def traced_run(tmp_path, accum=1, **profile):
    x, y = classification(8 * 8 * accum)
    t = Trainer(mlp(), lambda p: torch.optim.SGD(p, lr=0.1), (x, y), loss_fn=F.cross_entropy, run_dir=tmp_path,
                config=quiet(max_steps=6, batch_size=8, grad_accum_steps=accum, log_every_n_steps=2,
                             eval_every_n_epochs=None, profile=profile))
    t.fit()
    [trace] = sorted((tmp_path / "profile").iterdir())
    return trace, json.loads(trace.read_text())["traceEvents"]  # Chrome trace JSON: Perfetto reads it


def step_markers(events):
    return sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#"))


def test_the_trace_holds_exactly_the_configured_steps(tmp_path):
    trace, events = traced_run(tmp_path, start_step=3, steps=2)
    assert trace.name.startswith("rank0.") and trace.name.endswith(".pt.trace.json")  # TensorBoard's naming
    assert step_markers(events) == ["ProfilerStep#3", "ProfilerStep#4"]  # the warmup step 2 is not kept
    # The model's two Linear layers, once per step: the forward passes of steps 3 and 4 only.
    assert sum(e.get("name") == "aten::linear" for e in events) == 4
    assert not any("Input Dims" in e.get("args", {}) for e in events)  # record_shapes is off by default


def test_a_trace_from_the_first_step_with_accumulation_and_shapes(tmp_path):
    _, events = traced_run(tmp_path, accum=2, start_step=1, steps=1, record_shapes=True)  # no room for warmup
    assert step_markers(events) == ["ProfilerStep#1"]
    linear = [e for e in events if e.get("name") == "aten::linear"]
    assert len(linear) == 4  # two micro-batches through two layers
    assert [8, 8] in linear[0]["args"]["Input Dims"]


def test_no_trace_without_start_step_and_profile_needs_a_run_dir(tmp_path):
    x, y = classification(16)
    build = lambda run_dir, profile: Trainer(mlp(), lambda p: torch.optim.SGD(p, lr=0.1), (x, y),
                                             loss_fn=F.cross_entropy, run_dir=run_dir,
                                             config=quiet(max_steps=2, batch_size=8, profile=profile))
    with pytest.raises(ValueError, match="profile needs a run_dir"):
        build(None, {"start_step": 1})
    with pytest.warns(UserWarning, match="memory_snapshot_on_oom records CUDA memory only; ignored on cpu"):
        build(tmp_path, {"memory_snapshot_on_oom": True}).fit()
    assert not (tmp_path / "profile").exists()
    with pytest.warns(UserWarning, match=r"profile.start_step 50 is past the run's last step 2: no trace will be "
                                         r"written; set profile.start_step to 2 or less"):
        build(tmp_path / "late", {"start_step": 50}).fit()
    assert not (tmp_path / "late" / "profile").exists()


def test_out_of_memory_writes_the_memory_snapshot_and_names_it(tmp_path, monkeypatch):
    """The wiring, on CPU: the CUDA allocator's recording and dump stand in (real on CUDA: below)."""
    calls = []
    monkeypatch.setattr(profiling, "_records_cuda_memory", lambda device: True)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda **kw: calls.append(("record", kw)))

    def dump(path):
        calls.append(("dump", path))
        open(path, "wb").close()

    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump)

    class OutOfMemoryAtStep3(Trainer):
        def training_step(self, batch):
            if self.global_step == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return super().training_step(batch)

    x, y = classification(64)
    t = OutOfMemoryAtStep3(mlp(), lambda p: torch.optim.SGD(p, lr=0.1), (x, y), loss_fn=F.cross_entropy,
                           run_dir=tmp_path, config=quiet(max_steps=6, batch_size=8, profile={
                               "memory_snapshot_on_oom": True, "memory_snapshot_entries": 5000}))
    with pytest.raises(torch.OutOfMemoryError, match="out of memory at step 3") as caught:
        t.fit()
    path = tmp_path / "profile" / "memory-oom-rank0.pickle"
    assert f"Memory snapshot: {path}" in str(caught.value)
    assert calls == [("record", {"max_entries": 5000}), ("dump", str(path)), ("record", {"enabled": None})]
    assert path.exists()


@pytest.mark.cuda
def test_a_real_out_of_memory_leaves_a_snapshot_that_loads(tmp_path):
    import pickle

    class Greedy(Trainer):
        def training_step(self, batch):
            if self.global_step == 1:
                torch.empty(2**50, device=self.device)  # a petabyte
            return super().training_step(batch)

    x, y = classification(64)
    t = Greedy(mlp(), lambda p: torch.optim.SGD(p, lr=0.1), (x, y), loss_fn=F.cross_entropy, run_dir=tmp_path,
               config=quiet(device="cuda", max_steps=4, batch_size=8, profile={"memory_snapshot_on_oom": True,
                                                                                "start_step": 1, "steps": 1}))
    with pytest.raises(torch.OutOfMemoryError, match="Memory snapshot: "):
        t.fit()
    snapshot = pickle.loads((tmp_path / "profile" / "memory-oom-rank0.pickle").read_bytes())
    assert snapshot["segments"] and snapshot["device_traces"]
    # The trace of step 1 has the GPU's kernels beside the host's ops.
    [trace] = (tmp_path / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)


def test_a_run_that_ends_inside_the_window_traces_only_the_steps_that_ran(tmp_path):
    _, events = traced_run(tmp_path, start_step=5, steps=4)  # the run's last step is 6
    assert step_markers(events) == ["ProfilerStep#5", "ProfilerStep#6"]
