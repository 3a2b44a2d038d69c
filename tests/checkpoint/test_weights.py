"""trainer.weights and init_from: every kind of weights file read, checked, renamed and loaded into a
model before step 1; the meta device; resume. (Sharded models under torchrun: tests/parallel/test_distributed.py.)"""

import math
import shutil

import pytest
import safetensors.torch
import torch
from torch import nn

from trainer import Callback, Trainer, TrainerConfig, WeightsError, read_weights
from trainer.checkpoint import list_checkpoints, load_checkpoint, save_sharded
from trainer.examples.models import MLP
from trainer.checkpoint.weights import WeightsFile

X = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(1))


def mlp() -> MLP:
    return MLP(in_features=16, out_features=4, hidden=8)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


class FirstBatch(Callback):
    """The model's state before step 1, as training sees it."""

    def __init__(self):
        self.state = None

    def on_train_batch_start(self, trainer, batch):
        if self.state is None:
            self.state = {k: v.clone() for k, v in trainer.module.state_dict().items()}


def make(init_from=None, callbacks=(), run_dir=None, model=mlp, **config):
    config = {"max_steps": 1, "batch_size": 16, "progress": "off", "seed": 7, **config}
    if init_from is not None:
        config["init_from"] = init_from
    return Trainer(model, sgd, (X, Y), loss_fn=torch.nn.functional.cross_entropy, callbacks=list(callbacks),
                   run_dir=run_dir, config=config)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of each kind, and the tensors each holds as read without trainer.weights."""
    tmp = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    state = mlp().state_dict()
    torch.save(state, tmp / "model.pt")
    safetensors.torch.save_file(state, tmp / "model.safetensors")
    fitted = make(run_dir=tmp / "run", max_steps=2)
    fitted.fit()
    checkpoint = list_checkpoints(tmp / "run" / "checkpoints")[-1]
    # A sharded checkpoint as strategy: fsdp writes it, here from one process (DCP takes any number).
    whole = fitted.state_dict()
    save_sharded({**whole, "model": None, "optimizer": {"param_groups": whole["optimizer"]["param_groups"]}},
                 {"model": whole["model"], "optimizer": whole["optimizer"]["state"]}, tmp / "sharded", True)
    return {
        "state dict": (tmp / "model.pt", state),
        "safetensors": (tmp / "model.safetensors", state),
        "checkpoint": (checkpoint, torch.load(checkpoint, weights_only=True)["model"]),
        "sharded checkpoint": (tmp / "sharded", fitted.module.state_dict()),
    }


@pytest.mark.parametrize("kind", ["state dict", "safetensors", "checkpoint", "sharded checkpoint"])
def test_each_kind_is_read_and_training_starts_from_it(files, kind):
    path, held = files[kind]
    assert WeightsFile(path).kind == kind
    assert same(read_weights(path), held)
    seen = FirstBatch()
    t = make(init_from=str(path), callbacks=[seen], sanity_check=False)  # fit itself loads it
    assert not same(t.module.state_dict(), held)  # the seeded initial weights, until fit
    t.fit()
    assert same(seen.state, held)  # before step 1: the file's weights
    assert not same(t.module.state_dict(), held)  # and step 1 trained from them


def test_a_file_of_other_names_and_shapes_is_refused_listing_them_and_nothing_is_copied(tmp_path, files):
    state = dict(files["state dict"][1])
    del state["4.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["0.weight"] = torch.zeros(8, 15)
    torch.save(state, tmp_path / "other.pt")
    t = make(init_from=str(tmp_path / "other.pt"))
    before = {k: v.clone() for k, v in t.module.state_dict().items()}
    with pytest.raises(WeightsError) as raised:
        t.fit()
    message = str(raised.value)
    assert message.startswith(f"init_from: {tmp_path / 'other.pt'} does not match the model (")
    assert "missing from the file: 4.bias" in message and "not in the model: extra.weight" in message
    assert "different shapes: 0.weight (8, 15) in the file vs (8, 16) in the model" in message
    assert "rename" in message and "strict: false" in message  # the fixes
    assert same(t.module.state_dict(), before)
    assert t.global_step == 0


def test_strict_false_loads_the_names_both_have_and_warns_about_the_rest(tmp_path, files):
    state = dict(files["state dict"][1])
    del state["4.bias"]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "partial.pt")
    t = make(init_from={"path": str(tmp_path / "partial.pt"), "strict": False})
    initial = t.module.state_dict()["4.bias"].clone()
    with pytest.warns(UserWarning, match=r"missing from the file: 4\.bias; not in the model: extra\.weight; "
                                         r"the missing keep their initial values"):
        t.apply_init_from()
    loaded = t.module.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k != "extra.weight")
    assert torch.equal(loaded["4.bias"], initial)
    # A shape that differs is an error even so.
    state["0.weight"] = torch.zeros(8, 15)
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(WeightsError, match=r"different shapes: 0\.weight \(8, 15\)") as raised:
        make(init_from={"path": str(tmp_path / "partial.pt"), "strict": False}).apply_init_from()
    assert "missing from" not in str(raised.value)


def test_rename_maps_prefixes_then_regular_expressions(tmp_path, files):
    state = files["state dict"][1]
    # As saved from a DDP-wrapped model inside a larger one: module.backbone.layer0.weight for 0.weight.
    torch.save({f"module.backbone.layer{k}": v for k, v in state.items()}, tmp_path / "wrapped.pt")
    spec = {"path": str(tmp_path / "wrapped.pt"), "rename": {"module.": "unused.", "module.backbone.": ""},
            "rename_regex": {r"^layer(\d+)\.": r"\1.", r"^never$": "x"}}
    t = make(init_from=spec)
    with pytest.warns(UserWarning, match=r"rename entries that matched no name in the file: 'module\.', '\^never\$'"):
        assert t.apply_init_from().startswith(f"init_from: loaded 6 tensors from {tmp_path / 'wrapped.pt'}")
    assert same(t.module.state_dict(), state)  # the longest prefix applied, then the first pattern
    # Unrenamed, the error lists the file's names and the rename entries that did nothing.
    with pytest.raises(WeightsError, match=r"not in the model: module\.backbone\.layer0\.weight.*rename entries "
                                           r"that matched no name in the file: 'model\.'"):
        make(init_from={"path": str(tmp_path / "wrapped.pt"), "rename": {"model.": ""}}).apply_init_from()
    with pytest.raises(WeightsError, match=r"'module\.backbone\.layer0\.weight' and 'module\.backbone\.layer0\.bias' "
                                           r"both become 'x'"):
        make(init_from={"path": str(tmp_path / "wrapped.pt"), "rename_regex": {r"^.*$": "x"}}).apply_init_from()


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_are_stored_once(tmp_path):
    torch.manual_seed(3)
    source = Tied()
    with pytest.raises(RuntimeError):  # safetensors refuses two names for one tensor
        safetensors.torch.save_file(source.state_dict(), tmp_path / "tied.safetensors")
    safetensors.torch.save_model(source, tmp_path / "tied.safetensors")  # which keeps one name
    assert len(read_weights(tmp_path / "tied.safetensors")) == 1
    model = Tied()
    Trainer(model, sgd, config={"init_from": str(tmp_path / "tied.safetensors")}).apply_init_from()
    assert torch.equal(model.embed.weight, source.embed.weight) and model.head.weight is model.embed.weight


def test_files_that_are_not_weights_are_refused_naming_them(tmp_path, monkeypatch):
    cases = {
        "missing.pt": (None, "does not exist"),
        "list.pt": ([1, 2], "holds a list, not a state dict"),
        "module.pt": (nn.Linear(2, 2), "holds pickled Python objects, which could run code"),
        "text.safetensors": (b"hello", "is not a readable safetensors file"),
        "text.bin": (b"hello there\n", r"is not a checkpoint or a weights file .*: it holds text \('hello there'"),
        "empty.pt": ({}, "holds nothing, not a state dict"),
        "zero-bytes.pt": (b"", r"is not a checkpoint or a weights file .*: it holds nothing \(0 bytes\)"),
        "zeros.pt": (bytes(4096), r"is not a checkpoint or a weights file .*: it holds zeros"),
        "noise.pt": (b"\xa2\x8a\x8d\x74" * 8, r"is not a checkpoint or a weights file .*: it holds other bytes "
                                              r"\(it starts a2 8a 8d 74 a2 8a 8d 74\)"),
        "damaged.pt": (b"\x80\x02junk", "is neither a torch.save file nor a safetensors file"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save(content, path)
        with pytest.raises(WeightsError, match=expected) as raised:
            read_weights(path)
        assert str(path) in str(raised.value)
    with pytest.raises(WeightsError, match="^/dev/zero is a character device, not a weights file; name a checkpoint"):
        read_weights("/dev/zero")
    safetensors.torch.save_file({"a": torch.ones(2)}, tmp_path / "w.safetensors")
    monkeypatch.setitem(__import__("sys").modules, "safetensors", None)  # not installed
    with pytest.raises(WeightsError, match=r"needs the safetensors package: pip install 'trainer\[safetensors\]'"):
        read_weights(tmp_path / "w.safetensors")


# ----------------------------------------------------------------------------- the meta device


class Table(nn.Module):
    """A RoPE-like table kept out of state dicts, computed once."""

    def __init__(self):
        super().__init__()
        self.register_buffer("angles", torch.arange(4.0) * math.pi, persistent=False)


class Rotary(Table):
    """The same, with the method that computes it again."""

    def reset_parameters(self):
        with torch.no_grad():
            self.angles.copy_(torch.arange(4.0) * math.pi)


class WithTable(nn.Module):
    def __init__(self, table=Rotary):
        super().__init__()
        self.body = mlp()
        self.norm = nn.LayerNorm(4)
        self.rotary = table()

    def forward(self, x):
        return self.norm(self.body(x))


def test_a_model_on_the_meta_device_gets_memory_its_table_and_the_files_weights(tmp_path):
    torch.manual_seed(5)
    state = WithTable().state_dict()
    torch.save(state, tmp_path / "w.pt")
    with torch.device("meta"):
        model = WithTable()
    seen = FirstBatch()
    t = Trainer(model, sgd, (X, Y), loss_fn=torch.nn.functional.cross_entropy, callbacks=[seen],
                config={"init_from": str(tmp_path / "w.pt"), "max_steps": 1, "progress": "off"})
    assert not any(p.is_meta for p in t.module.parameters())
    assert torch.equal(t.module.rotary.angles, torch.arange(4.0) * math.pi)  # by reset_parameters()
    t.fit()
    assert same(seen.state, state)

    # Missing from the file under strict: false: set by the reset_parameters() of the module holding them.
    torch.save({k: v for k, v in state.items() if not k.startswith("norm.")}, tmp_path / "partial.pt")
    with torch.device("meta"):
        model = WithTable()
    t = Trainer(model, sgd, config={"init_from": {"path": str(tmp_path / "partial.pt"), "strict": False}})
    with pytest.warns(UserWarning, match=r"missing from the file: norm\.weight, norm\.bias; the missing are set by "
                                         r"reset_parameters\(\)"):
        t.apply_init_from()
    assert torch.equal(model.norm.weight, torch.ones(4)) and torch.equal(model.norm.bias, torch.zeros(4))


def test_a_meta_model_whose_table_nothing_can_set_is_refused(tmp_path):
    with torch.device("meta"):
        model = WithTable(table=Table)
    with pytest.raises(WeightsError, match=r"rotary\.angles are buffers kept out of state dicts \(persistent=False\).*"
                                           r"Table \(rotary\), which holds them, has no reset_parameters\(\).*define "
                                           r"Table\.reset_parameters\(\)"):
        Trainer(model, sgd, config={"init_from": "w.pt"})
    with torch.device("meta"):
        model = WithTable()
    with pytest.raises(ValueError, match="on the meta device, without values: set init_from"):
        Trainer(model, sgd)
    with pytest.raises(ValueError, match="pass a function of the parameters instead"):
        Trainer(model, sgd(model.parameters()), config={"init_from": "w.pt"})


# ----------------------------------------------------------------------------- once, before the first step


def test_a_resumed_run_continues_from_its_checkpoint_without_reading_init_from(tmp_path, files):
    path = tmp_path / "start.pt"
    shutil.copy(files["state dict"][0], path)
    first = make(init_from=str(path), run_dir=tmp_path / "run", max_steps=2)
    first.fit()
    checkpoint = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    path.unlink()  # a resume does not need it, and does not read it
    seen = FirstBatch()
    resumed = make(init_from=str(path), run_dir=tmp_path / "run", max_steps=3, callbacks=[seen])
    resumed.fit(resume_from=checkpoint)
    assert same(seen.state, load_checkpoint(checkpoint)["model"])
    # Loaded weights of any other origin also take the place of init_from: trainer eval's, a state dict.
    other = make(init_from=str(path))
    other.load_weights(checkpoint)
    other.evaluate((X, Y))
    other.load_model_state(files["state dict"][1])
    assert other.apply_init_from() is None
    # And without them, the missing file is an error that names it, when fit (or evaluate) needs the weights.
    with pytest.raises(WeightsError, match=f"init_from: {path} does not exist"):
        make(init_from=str(path)).evaluate((X, Y))


def test_init_from_in_the_config(tmp_path):
    assert TrainerConfig(init_from="w.pt").init_from.model_dump() == {
        "path": "w.pt", "strict": True, "rename": {}, "rename_regex": {}}
    assert TrainerConfig(init_from=tmp_path / "w.pt").init_from.path == str(tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"'\(' is not a regular expression"):
        TrainerConfig(init_from={"path": "w.pt", "rename_regex": {"(": ""}})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        TrainerConfig(init_from={"path": "w.pt", "strict_mode": False})
    # Recorded in the configuration checkpoints keep.
    t = make(init_from={"path": "w.pt", "rename": {"a.": "b."}})
    assert t.state_dict()["config"]["init_from"] == {"path": "w.pt", "strict": True, "rename": {"a.": "b."},
                                                     "rename_regex": {}}


@pytest.mark.parametrize("suffix", ["pt", "safetensors"])
def test_integers_into_floating_point_weights_are_refused_and_precisions_are_cast(tmp_path, files, suffix):
    state = files["state dict"][1]
    save = torch.save if suffix == "pt" else safetensors.torch.save_file
    save({k: (v * 100).long() for k, v in state.items()}, tmp_path / f"ints.{suffix}")
    t = make(init_from=str(tmp_path / f"ints.{suffix}"))
    before = {k: v.clone() for k, v in t.module.state_dict().items()}
    with pytest.raises(WeightsError, match=r"another kind of number: 0.weight \(torch.int64 in the file, "
                                           r"torch.float32 in the model\)"):
        t.apply_init_from()
    assert same(t.module.state_dict(), before)  # nothing copied
    save({k: v.half() for k, v in state.items()}, tmp_path / f"half.{suffix}")  # fp16 weights: cast, as asked
    t = make(init_from=str(tmp_path / f"half.{suffix}"))
    t.apply_init_from()
    assert same(t.module.state_dict(), {k: v.half().float() for k, v in state.items()})


def test_tied_names_with_different_values_in_the_file_are_refused(tmp_path):
    torch.manual_seed(3)
    state = {k: v.clone() for k, v in Tied().state_dict().items()}
    assert len(state) == 2  # both names of the tied tensor
    torch.save(state, tmp_path / "same.pt")
    model = Tied()
    Trainer(model, sgd, config={"init_from": str(tmp_path / "same.pt")}).apply_init_from()  # equal: fine
    assert model.head.weight is model.embed.weight and torch.equal(model.embed.weight, state["embed.weight"])
    state["head.weight"] = state["head.weight"] + 1
    torch.save(state, tmp_path / "differ.pt")
    with pytest.raises(WeightsError, match="one tensor in the model .tied weights. but hold different values"):
        Trainer(Tied(), sgd, config={"init_from": str(tmp_path / "differ.pt")}).apply_init_from()


def test_a_run_directory_is_refused_naming_its_newest_checkpoint(files):
    run = files["checkpoint"][0].parents[1]
    with pytest.raises(WeightsError, match=f"is a run directory; name one of its checkpoints: the newest is "
                                           f"{files['checkpoint'][0]}"):
        make(init_from=str(run)).apply_init_from()
