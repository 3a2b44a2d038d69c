"""export_model: a checkpoint's weights (or its EMA) as a .safetensors file that loads strictly into
the model its .yaml builds; file and sharded checkpoints, dtypes, tied weights, damaged checkpoints."""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import batches, quiet
from trainer import EMAWeights, Trainer
from trainer.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from trainer.checkpoint.files import save_checkpoint
from trainer.examples.char_lm import CharTransformer
from trainer.examples.models import MLP
from trainer.evaluation.export import ExportError, build_model, export_model
from trainer.yaml_source import ConfigError

MLP_SECTION = {"_target_": "trainer.examples.models.MLP", "in_features": 8, "hidden": 16, "out_features": 3}
LM_SECTION = {"_target_": "trainer.examples.char_lm.CharTransformer", "block_size": 8, "d_model": 16,
              "n_layers": 1, "n_heads": 2, "dropout": 0.0}


def train(tmp_path, model, data, callbacks=(), steps=4, section=MLP_SECTION, every=None, **config):
    """A run of ``steps`` SGD steps in ``tmp_path/run``; the saved config holds ``section`` as its
    model, as a run from a config file does (None: a Trainer built in code, no model section)."""
    cfg = quiet(max_steps=steps, batch_size=len(data[0][0]), checkpoint={"every_n_steps": every}, **config)
    run_config = {**cfg, "model": section} if section is not None else None
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), data,
                      loss_fn=torch.nn.functional.cross_entropy, callbacks=list(callbacks), config=cfg,
                      run_dir=tmp_path / "run", run_config=run_config)
    trainer.fit()
    return tmp_path / "run"


def mlp_run(tmp_path, **kwargs):
    torch.manual_seed(0)
    return train(tmp_path, MLP(8, 3, hidden=16), batches(4, 8), **kwargs)


def test_a_plain_run_exports_its_newest_checkpoint_exactly_with_its_model_config(tmp_path):
    run = mlp_run(tmp_path, every=2)
    done = export_model(run, tmp_path / "model.safetensors")
    newest = load_checkpoint(run / "checkpoints" / "step-00000004.pt")
    assert (done.step, done.ema, done.dtype, done.config) == (4, None, "fp32", tmp_path / "model.yaml")
    assert done.checkpoint == run / "checkpoints" / "step-00000004.pt"
    model = build_model(tmp_path / "model.yaml")
    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert model.state_dict().keys() == newest["model"].keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, newest["model"][key]), key
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "4" and meta["weights"] == "trained" and meta["dtype"] == "fp32"
    assert meta["checkpoint"] == str(done.checkpoint.resolve()) and "ema_state_key" not in meta
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_a_trainer_built_in_code_exports_the_weights_without_a_config(tmp_path):
    run = mlp_run(tmp_path, section=None)
    done = export_model(run / "checkpoints" / "step-00000004.pt", tmp_path / "w.safetensors")
    assert done.config is None and not (tmp_path / "w.yaml").exists()
    assert set(load_file(tmp_path / "w.safetensors")) == set(load_checkpoint(done.checkpoint)["model"])


def test_the_ema_is_exported_when_the_run_kept_one_and_the_trained_weights_on_request(tmp_path):
    run = mlp_run(tmp_path, callbacks=[EMAWeights(decay=0.5)])
    state = load_checkpoint(run / "checkpoints" / "step-00000004.pt")
    ema, trained = state["callbacks"]["EMAWeights"]["ema"], state["model"]
    assert any(not torch.equal(ema[k], trained[k]) for k in ema)  # the test can tell them apart

    done = export_model(run, tmp_path / "ema.safetensors")
    assert done.ema == "EMAWeights"
    exported = load_file(tmp_path / "ema.safetensors")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    with safe_open(tmp_path / "ema.safetensors", "pt") as f:
        assert f.metadata()["weights"] == "ema" and f.metadata()["ema_state_key"] == "EMAWeights"
    build_model(tmp_path / "ema.yaml").load_state_dict(exported, strict=True)

    export_model(run, tmp_path / "trained.safetensors", weights="trained")
    exported = load_file(tmp_path / "trained.safetensors")
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


def test_two_emas_are_told_apart_by_state_key(tmp_path):
    run = mlp_run(tmp_path, callbacks=[EMAWeights(decay=0.5), EMAWeights(decay=0.9, state_key="slow")])
    with pytest.raises(ExportError, match=r"several EMAs of the weights \(EMAWeights, slow\); pick one with --weights"):
        export_model(run, tmp_path / "m.safetensors")
    done = export_model(run, tmp_path / "m.safetensors", weights="slow")
    slow = load_checkpoint(done.checkpoint)["callbacks"]["slow"]["ema"]
    exported = load_file(tmp_path / "m.safetensors")
    assert done.ema == "slow" and all(torch.equal(exported[k], slow[k]) for k in slow)


def test_bf16_casts_the_floating_point_tensors_and_keeps_integer_buffers(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3))
    run = train(tmp_path, model, batches(4, 8), section=None)
    saved = load_checkpoint(run / "checkpoints" / "step-00000004.pt")["model"]
    done = export_model(run, tmp_path / "m.safetensors", dtype="bf16")
    exported = load_file(tmp_path / "m.safetensors")
    assert done.dtype == "bf16" and exported["1.num_batches_tracked"].dtype == torch.int64
    for key, value in saved.items():
        expected = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert exported[key].dtype == expected.dtype and torch.equal(exported[key], expected), key
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert f.metadata()["dtype"] == "bf16"
    model.load_state_dict(exported, strict=True)  # cast back on load
    assert torch.equal(model[0].weight, saved["0.weight"].to(torch.bfloat16).float())


class LM(Trainer):
    def training_step(self, batch):
        logits = self.model(batch[0])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[1].flatten())


LM_DATA = torch.randint(0, 256, (16, 8), generator=torch.Generator().manual_seed(0))
LM_BATCHES = [(LM_DATA[i:i + 4], LM_DATA[i:i + 4].roll(-1, 1)) for i in range(0, 16, 4)]


def lm_run(tmp_path, callbacks=()):
    """Two steps of char_lm, whose output layer is tied to its embedding, in ``tmp_path/run``."""
    torch.manual_seed(0)
    model = CharTransformer(**{k: v for k, v in LM_SECTION.items() if k != "_target_"})
    cfg = quiet(max_steps=2, batch_size=4)
    LM(model, torch.optim.SGD(model.parameters(), lr=0.5), LM_BATCHES, config=cfg, callbacks=list(callbacks),
       run_dir=tmp_path / "run", run_config={**cfg, "model": LM_SECTION}).fit()
    return tmp_path / "run"


def test_tied_weights_are_stored_under_both_names_and_load_strictly(tmp_path):
    lm_run(tmp_path)
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002.pt")["model"]
    assert saved["head.weight"].data_ptr() == saved["tok.weight"].data_ptr()  # tied in the checkpoint
    export_model(tmp_path / "run", tmp_path / "lm.safetensors")
    exported = load_file(tmp_path / "lm.safetensors")
    assert {"tok.weight", "head.weight"} <= exported.keys()
    assert torch.equal(exported["head.weight"], saved["tok.weight"])
    fresh = build_model(tmp_path / "lm.yaml")
    fresh.load_state_dict(exported, strict=True)
    assert fresh.head.weight is fresh.tok.weight  # still tied after loading
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())


def test_a_damaged_newest_checkpoint_is_passed_over_as_resume_does(tmp_path):
    run = mlp_run(tmp_path, every=2)
    newest = run / "checkpoints" / "step-00000004.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning) as caught:
        done = export_model(run, tmp_path / "m.safetensors")
    assert done.step == 2
    assert [str(w.message) for w in caught] == [
        f"checkpoint {newest} is corrupted: its bytes do not match the SHA-256 digest it was written with; "
        "trying the previous checkpoint",
        f"export: {newest} could not be loaded; falling back to {run / 'checkpoints' / 'step-00000002.pt'} (step 2)"]


def test_mistakes_are_export_errors_that_say_what_to_pass(tmp_path):
    run = mlp_run(tmp_path)
    (tmp_path / "empty-run").mkdir()
    (tmp_path / "empty-run" / "config.yaml").write_text("name: x\n")
    (tmp_path / "folder").mkdir()
    cases = [
        ((tmp_path / "nothing", tmp_path / "m.safetensors"), "does not exist; pass a run directory"),
        ((tmp_path / "folder", tmp_path / "m.safetensors"), "neither a run directory"),
        ((tmp_path / "empty-run", tmp_path / "m.safetensors"), "has no checkpoint in"),
        ((run, tmp_path / "no" / "m.safetensors"), "the folder .*no does not exist"),
        ((run, tmp_path / "m.pt"), "name the weights file NAME.safetensors"),
        ((run, tmp_path / "folder.safetensors"), None),
    ]
    (tmp_path / "folder.safetensors").mkdir()
    cases[-1] = (cases[-1][0], "is a folder; pass a file name")
    for (source, out), message in cases:
        with pytest.raises(ExportError, match=message):
            export_model(source, out)
    with pytest.raises(ExportError, match="dtype 'fp8' is not one export writes: choose bf16, fp16 or fp32"):
        export_model(run, tmp_path / "m.safetensors", dtype="fp8")
    with pytest.raises(ExportError, match="holds no EMA of the weights"):
        export_model(run, tmp_path / "m.safetensors", weights="ema")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        export_model(tmp_path / "junk.pt", tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.fixture
def one_rank_fsdp(tmp_path, monkeypatch):
    """A gloo group of one process, with the Trainer sharding as under ``strategy: fsdp`` on several
    ranks: DTensor parameters, and checkpoints written as DCP directories."""
    from trainer.parallel import strategy as strategies

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    monkeypatch.setattr(strategies, "choose", lambda name, layout, device, shard: strategies.FSDP(layout, device, shard))
    yield
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_sharded_checkpoint_is_consolidated_into_one_file(tmp_path, one_rank_fsdp):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    torch.manual_seed(0)
    model = CharTransformer(**{k: v for k, v in LM_SECTION.items() if k != "_target_"})
    x = torch.randint(0, 256, (16, 8))
    data = [(x[i:i + 4], x[i:i + 4].roll(-1, 1)) for i in range(0, 16, 4)]

    class LM(Trainer):
        def training_step(self, batch):
            logits = self.model(batch[0])
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[1].flatten())

    cfg = quiet(max_steps=2, batch_size=4, strategy="fsdp", sanity_check=False)
    LM(model, lambda params: torch.optim.AdamW(params, lr=1e-2), data, config=cfg, run_dir=tmp_path / "run",
       run_config={**cfg, "model": LM_SECTION}).fit()
    directory = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert directory.is_dir() and any(p.suffix == ".distcp" for p in directory.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DCP's own warnings too: nothing to say on a good checkpoint
        done = export_model(tmp_path / "run", tmp_path / "lm.safetensors", dtype="fp16")
    assert done.checkpoint == directory and done.step == 2
    dcp_to_torch_save(directory, tmp_path / "full.pt")  # torch's own consolidation, for comparison
    expected = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    exported = load_file(tmp_path / "lm.safetensors")
    assert exported.keys() == expected.keys() and len(expected) > 4
    assert all(torch.equal(exported[k], v.to(torch.float16)) for k, v in expected.items())
    build_model(tmp_path / "lm.yaml").load_state_dict(exported, strict=True)
    assert os.listdir(tmp_path).count("lm.safetensors") == 1


def test_a_failed_write_leaves_the_earlier_export_whole(tmp_path):
    run = mlp_run(tmp_path)
    export_model(run, tmp_path / "m.safetensors")
    before = (tmp_path / "m.safetensors").read_bytes()
    # A folder where the temp file goes makes the writer fail as a full disk would, part-way.
    (tmp_path / f".m.safetensors.tmp-{os.getpid()}").mkdir()
    with pytest.raises(ExportError, match=r"could not write .*m.safetensors .*any earlier m.safetensors is intact"):
        export_model(run, tmp_path / "m.safetensors", dtype="bf16", overwrite=True)
    assert (tmp_path / "m.safetensors").read_bytes() == before


def test_an_export_is_what_init_from_starts_a_new_run_from(tmp_path):
    """The round trip a fine-tuning user makes: the EMA of a run with tied weights, exported in bf16,
    is the starting point of a new fp32 run (init_from), exactly, tie kept."""
    lm_run(tmp_path, callbacks=[EMAWeights(decay=0.5)])
    done = export_model(tmp_path / "run", tmp_path / "lm.safetensors", dtype="bf16")
    assert done.ema == "EMAWeights"
    exported = load_file(tmp_path / "lm.safetensors")

    fresh = build_model(tmp_path / "lm.yaml")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    second = LM(fresh, torch.optim.SGD(fresh.parameters(), lr=0.5), LM_BATCHES,
                config=quiet(max_steps=1, batch_size=4, init_from=str(tmp_path / "lm.safetensors")))
    assert second.apply_init_from() is not None
    state = second.module.state_dict()
    assert state.keys() == exported.keys()
    for key, value in state.items():
        assert value.dtype == torch.float32, key  # the model's dtype, the file's values
        assert torch.equal(value, exported[key].float()), key
    assert not torch.equal(state["tok.weight"], before["tok.weight"])  # the file's values, not the fresh model's
    assert second.module.head.weight is second.module.tok.weight


def test_fp16_that_would_turn_a_weight_into_inf_is_refused_and_bf16_keeps_it(tmp_path):
    run = mlp_run(tmp_path)
    checkpoint = run / "checkpoints" / "step-00000004.pt"
    state = load_checkpoint(checkpoint)
    state["model"]["0.weight"][0, 0] = 1e6  # beyond fp16's 65504
    big = tmp_path / "big.pt"
    torch.save({k: v for k, v in state.items() if k != "path"}, big)
    with pytest.raises(ExportError, match=r"0.weight does not fit torch.float16 \(largest magnitude 1e\+06"):
        export_model(big, tmp_path / "half.safetensors", dtype="fp16")
    assert not (tmp_path / "half.safetensors").exists()
    export_model(big, tmp_path / "bf16.safetensors", dtype="bf16")
    assert load_file(tmp_path / "bf16.safetensors")["0.weight"][0, 0].item() == 1e6 // 4096 * 4096  # bf16's rounding


def test_an_export_never_replaces_the_runs_own_config(tmp_path):
    run = mlp_run(tmp_path)
    (run / "config.yaml").write_text("name: kept\n")  # as trainer run writes it
    kept = (run / "config.yaml").read_bytes()
    with pytest.raises(ExportError, match="its config would replace the run's own"):
        export_model(run, run / "config.safetensors")
    assert (run / "config.yaml").read_bytes() == kept and not (run / "config.safetensors").exists()


def with_model(run, section, path):
    """The run's newest checkpoint with ``section`` as its config's model, written (and signed) as
    trainer writes checkpoints: what a checkpoint from elsewhere can hold."""
    state = load_checkpoint(run / "checkpoints" / "step-00000004.pt")
    state.pop("path", None)
    state["config"] = {**state["config"], "model": section}
    save_checkpoint(state, path)
    return path


@pytest.mark.parametrize("where", ["model", "argument", "through torch.nn"])
def test_a_checkpoint_whose_config_names_other_code_is_exported_and_built_without_running_it(tmp_path, where):
    """os.system named by a checkpoint's config, as the model, as an argument of an allowed model
    (built before the model), or reached through an attribute of a torch.nn module: export copies
    it, build_model refuses it in one line naming the target, the file and what to pass, and the
    command never runs."""
    marker = tmp_path / "ran"
    call = {"_target_": "os.system", "command": f"touch {marker}"}
    section = {"model": call,
               "argument": {**MLP_SECTION, "hidden": call},
               "through torch.nn": {**call, "_target_": "torch.nn.modules.module.torch.os.system"}}[where]
    run = mlp_run(tmp_path)
    export_model(with_model(run, section, tmp_path / "signed.pt"), tmp_path / "m.safetensors")
    config = tmp_path / "m.yaml"
    with pytest.raises(ConfigError) as caught:
        build_model(config)
    message = str(caught.value)
    target = call["_target_"] if where != "through torch.nn" else section["_target_"]
    assert message.splitlines() == [message]
    assert f"'{target}' is not a torch.nn or trainer module class" in message
    assert message.endswith(f"if you trust {config}, call build_model('{config}', trust='{target.rsplit('.', 1)[0]}')")
    assert not marker.exists()


def test_a_trusted_module_builds_and_an_untrusted_one_is_not_even_imported(tmp_path, monkeypatch):
    """The user's own model module: refused without trust, before it is imported (importing runs its
    code); built with trust naming it."""
    marker = tmp_path / "imported"
    (tmp_path / "own_models_for_trust.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nfrom trainer.examples.models import MLP\n\n\n"
        "class Net(MLP):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = mlp_run(tmp_path)
    section = {**MLP_SECTION, "_target_": "own_models_for_trust.Net"}
    done = export_model(with_model(run, section, tmp_path / "own.pt"), tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match=r"trust='own_models_for_trust'\)$"):
        build_model(done.config)
    assert not marker.exists()
    model = build_model(done.config, trust="own_models_for_trust")
    model.load_state_dict(load_file(done.weights), strict=True)
    assert type(model).__name__ == "Net" and marker.exists()


def test_an_export_replaces_no_file_unless_told_to(tmp_path):
    run = mlp_run(tmp_path)
    for existing in ("m.yaml", "m.safetensors"):
        (tmp_path / existing).write_text("mine")
        with pytest.raises(ExportError) as caught:
            export_model(run, tmp_path / "m.safetensors")
        assert str(caught.value) == f"{tmp_path / existing} exists; pass --overwrite to replace it, or pick another --out"
        assert (tmp_path / existing).read_text() == "mine"
        assert sorted(p.name for p in tmp_path.glob("m.*")) == [existing]
        (tmp_path / existing).unlink()
    (tmp_path / "m.yaml").write_text("mine")
    done = export_model(run, tmp_path / "m.safetensors", overwrite=True)
    build_model(done.config).load_state_dict(load_file(done.weights), strict=True)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_the_exported_files_get_the_modes_the_umask_gives(tmp_path, umask):
    run = mlp_run(tmp_path)
    old = os.umask(umask)
    try:
        done = export_model(run, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    for path in (done.weights, done.config):
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~umask), path
