"""From config to objects: importing targets, checking arguments before calling, splitting data,
and the optimizer factory's kernel choice."""

import json
import re

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

from helpers import ROOT, in_process
from trainer import run_dir as run_files
from trainer.cli.build import data_splits, kernel_defaults, optimizer_factory, split_data
from trainer.components import Component, check_arguments, import_target, instantiate
from trainer.yaml_source import ConfigError, Source, Where

AT = ("optimizer",)


@pytest.fixture
def source():
    return Source({}, "cfg.yaml", {AT: Where("cfg.yaml", 7, 3), AT + ("lr",): Where("cfg.yaml", 9, 7)})


def component(**kwargs):
    return Component.model_validate(kwargs)


def test_import_target_suggests_the_closest_name(source):
    assert import_target("torch.optim.SGD", source, AT) is torch.optim.SGD
    with pytest.raises(ConfigError, match=r"cfg.yaml:7:3: optimizer: .*did you mean 'torch.optim.SGD'\?"):
        import_target("torch.optim.SDG", source, AT)
    with pytest.raises(ConfigError, match="no module named 'no_such_pkg'"):
        import_target("no_such_pkg.X", source, AT)


def test_check_arguments_converts_by_type_hint_and_names_the_argument(source):
    def make(params, lr: float, momentum: float = 0.0):
        return params, lr, momentum

    assert check_arguments(make, {"lr": "3e-4"}, source, AT, 1, "make") == {"lr": 3e-4}
    with pytest.raises(ConfigError, match=r"cfg.yaml:9:7: optimizer.lr: make expects float for 'lr', found 'abc'"):
        check_arguments(make, {"lr": "abc"}, source, AT, 1, "make")
    with pytest.raises(ConfigError, match="takes no argument 'momentun'; did you mean 'momentum'"):
        check_arguments(make, {"lr": 1, "momentun": 0.9}, source, AT, 1, "make")
    with pytest.raises(ConfigError, match="make needs the argument 'lr'"):
        check_arguments(make, {}, source, AT, 1, "make")


def test_instantiate_builds_nested_components_and_blames_a_raising_target(source):
    layer = {"_target_": "torch.nn.TransformerEncoderLayer", "d_model": 4, "nhead": 1, "dim_feedforward": 8,
             "batch_first": True}
    made = instantiate(component(_target_="torch.nn.TransformerEncoder", encoder_layer=layer, num_layers=1,
                                 enable_nested_tensor=False),
                       source, AT)
    assert isinstance(made.layers[0], torch.nn.TransformerEncoderLayer)
    with pytest.raises(ConfigError, match=r"cfg.yaml:7:3: optimizer: torch.optim.SGD\(...\) raised ValueError"):
        instantiate(component(_target_="torch.optim.SGD", lr=-1.0), source, AT, [torch.nn.Parameter(torch.ones(1))])


def test_split_data_forms(source):
    assert split_data({"train": 1, "val": 2}, source) == (1, 2)
    assert split_data((1, 2), source) == (1, 2)
    x = torch.ones(3)
    assert split_data((x, x), source) == ((x, x), None)  # a tensor pair is training data, not (train, val)
    assert data_splits({"train": 1, "val": None, "test": 3}, source) == {"train": 1, "test": 3}
    assert data_splits((1, 2), source) == {"train": 1, "val": 2}
    with pytest.raises(ConfigError, match="unknown keys \\['tset'\\]; expected 'train', 'val' and 'test'"):
        split_data({"train": 1, "tset": 2}, source)


def test_the_optimizer_factory_checks_now_and_builds_later(source):
    with pytest.raises(ConfigError, match="takes no argument 'lrr'"):
        optimizer_factory(component(_target_="torch.optim.SGD", lrr=0.1), source)
    factory = optimizer_factory(component(_target_="torch.optim.SGD", lr=-1.0), source)
    with pytest.raises(ConfigError, match=r"cfg.yaml:7:3: optimizer: .*Invalid learning rate"):
        factory([torch.nn.Parameter(torch.ones(1))])


def test_plain_parameters_get_fused_kernels_unless_the_config_chose():
    params = [torch.nn.Parameter(torch.ones(2))]
    assert kernel_defaults(torch.optim.SGD, params) == {"fused": True}
    assert kernel_defaults(torch.optim.AdamW, params) == {"fused": True}
    assert kernel_defaults(torch.optim.RMSprop, params) == {}
    source = Source({}, "cfg.yaml", {})
    built = optimizer_factory(component(_target_="torch.optim.SGD", lr=0.1), source)(params)
    assert built.param_groups[0]["fused"] is True
    built = optimizer_factory(component(_target_="torch.optim.SGD", lr=0.1, foreach=False), source)(params)
    assert not built.param_groups[0]["fused"] and built.param_groups[0]["foreach"] is False
    # compile: {optimizer: true} generates the kernel from the optimizer's own code: torch's default
    built = optimizer_factory(component(_target_="torch.optim.AdamW", lr=0.1), source, compiled=True)(params)
    assert not built.param_groups[0]["fused"] and built.param_groups[0]["foreach"] is None


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo group of one process, enough to make DTensors on the CPU."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_sharded_parameters_get_foreach_sgd_and_fused_adam(one_rank_group):
    from torch.distributed.tensor import Shard, distribute_tensor

    params = [torch.nn.Parameter(distribute_tensor(torch.ones(4), one_rank_group, [Shard(0)]))]
    assert kernel_defaults(torch.optim.SGD, params) == {"foreach": True}
    assert kernel_defaults(torch.optim.AdamW, params) == {"fused": True}
    built = optimizer_factory(component(_target_="torch.optim.SGD", lr=0.1), Source({}, "cfg.yaml", {}))(params)
    assert built.param_groups[0]["foreach"] is True and not built.param_groups[0]["fused"]


GAN = """\
name: gan
max_steps: 2
batch_size: 16
progress: "off"
trainer: trainer.examples.gan.GANTrainer
model: {_target_: trainer.examples.gan.GAN, latent: 8, hidden: 8}
data: {_target_: trainer.examples.gan.ring, n_train: 64, n_val: 16}
optimizers:
  generator:
    params: generator.*
    optimizer: {_target_: torch.optim.Adam, lr: 1.0e-3}
    scheduler: {_target_: torch.optim.lr_scheduler.StepLR, step_size: 1}
  discriminator:
    params: [discriminator.*]
    optimizer: {_target_: torch.optim.SGD, lr: 1.0e-2}
"""


def test_several_optimizers_from_yaml_each_over_its_patterns(tmp_path):
    from trainer.cli.build import build
    from trainer.cli.run_config import validate

    def load_run(path, overrides):
        source = Source.load(path)
        return source, validate(source)

    path = tmp_path / "gan.yaml"
    path.write_text(GAN)
    source, run = load_run(path, [])
    t = build(source, run, None).trainer
    g, d = t.optimizers
    assert isinstance(g, torch.optim.Adam) and isinstance(d, torch.optim.SGD)
    assert [p for group in g.param_groups for p in group["params"]] == list(t.module.generator.parameters())
    assert [p for group in d.param_groups for p in group["params"]] == list(t.module.discriminator.parameters())
    assert isinstance(t.schedulers[0], torch.optim.lr_scheduler.StepLR) and t.schedulers[1] is None
    assert g.param_groups[0]["fused"] and d.param_groups[0]["fused"]  # the kernel a single optimizer gets

    path.write_text(GAN.replace("params: [discriminator.*]", "params: [discrim.*]"))
    with pytest.raises(ConfigError, match=r"gan.yaml:14:\d+: optimizers.discriminator.params: the pattern 'discrim.\*' "
                                          r"matches no parameter; parameters are: generator.0.weight"):
        build(*load_run(path, []), None)
    path.write_text(GAN + "optimizer: {_target_: torch.optim.SGD, lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"optimizer: give either optimizer: \(with scheduler:\) or optimizers:"):
        build(*load_run(path, []), None)
    path.write_text(GAN.replace("trainer: trainer.examples.gan.GANTrainer", "trainer: trainer.Trainer")
                    + "loss: torch.nn.functional.mse_loss\n")
    with pytest.raises(ConfigError, match=r"2 optimizers were given, and the automatic training step steps one"):
        build(*load_run(path, []), None)


def test_the_base_trainer_named_by_target_trains_as_when_left_out(project):
    # The form docs/config.md shows, {_target_: ...}, naming the base Trainer itself: the same run,
    # the same config.yaml, as with no trainer: at all.
    left_out = in_process("run", project.config, "name=plain", cwd=project.root)
    assert left_out.returncode == 0, left_out.stderr
    project.write("trainer: {_target_: trainer.Trainer}\n" + project.text)
    named = in_process("run", project.config, "name=named", cwd=project.root)
    assert named.returncode == 0, named.stderr
    plain, explicit = project.runs / "plain", project.runs / "named"
    assert (explicit / "config.yaml").read_text() == (plain / "config.yaml").read_text().replace("name: plain",
                                                                                              "name: named")
    assert losses(explicit) == losses(plain) and losses(plain)


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k in ("step", "epoch") or k.endswith("loss")} for r in records]


def test_a_trainer_subclass_with_the_base_signature_takes_only_its_own_arguments(project):
    # The arguments build passes every Trainer (model, data, optimizer, ...) come from the config's
    # other sections: the subclass's own keyword arguments are the only ones trainer: may set.
    project.write("""\
        from trainer import Trainer

        class Scaled(Trainer):
            def __init__(self, model, optimizer=None, train_data=None, val_data=None, *, scale: float = 1.0,
                         **kwargs):
                super().__init__(model, optimizer, train_data, val_data, **kwargs)
                self.scale = scale

            def training_step(self, batch):
                out = super().training_step(batch)
                self.log("train/scale", self.scale)
                return out
        """, "my_trainer.py")
    project.write("trainer: {_target_: my_trainer.Scaled, scale: 2.5}\n" + project.text)
    proc = in_process("run", project.config, cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert '"train/scale": 2.5' in (project.runs / "t" / "metrics.jsonl").read_text()

    line = "trainer: {_target_: my_trainer.Scaled, model: my_models.Net}"
    project.write(line + "\n" + project.text)
    proc = in_process("check", project.config, cwd=project.root)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: {project.config}:1:{line.index('my_models') + 1}: trainer.model: "
                                   "my_trainer.Scaled gets 'model' from the config's other sections, not as an "
                                   "argument here; remove it (it takes: scale)")


def test_the_custom_loss_of_docs_config_md_trains_as_written(project):
    """The example under "What `loss:` is called with": its module beside the config, its config line."""
    text = (ROOT / "docs" / "config.md").read_text()
    section = text[text.index("**What `loss:` is called with.**"):]
    module = re.search(r"```python\n(# (\w+)\.py.*?)```", section, re.S)
    line = re.search(r"```yaml\n(loss: .*?)\n```", section, re.S).group(1)
    (project.root / f"{module.group(2)}.py").write_text(module.group(1))
    project.write(project.text.replace("loss: torch.nn.functional.cross_entropy\n", line + "\n"))
    proc = in_process("run", project.config, cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    plain = in_process("run", project.config, "name=plain", "loss=torch.nn.functional.cross_entropy", cwd=project.root)
    assert plain.returncode == 0, plain.stderr
    losses = [[json.loads(r)["train/loss"] for r in (project.runs / name / "metrics.jsonl").read_text().splitlines()
               if "train/loss" in r] for name in ("t", "plain")]
    assert len(losses[0]) == 2 and losses[0] != losses[1]  # the smoothed loss trained, not the plain one
    namespace: dict = {}
    exec(module.group(1), namespace)
    outputs, targets = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    assert torch.allclose(namespace[line.split()[1].split(".")[1]](outputs, targets),
                          F.cross_entropy(outputs, targets, label_smoothing=0.1))


# ------------------------------------------------------------------ a config's optimizer beside configure_optimizers

MINE = """\
import torch
from trainer import Trainer


class MyTrainer(Trainer):
    def configure_optimizers(self):
        return torch.optim.SGD(self.trainable_parameters(), lr=3e-3)
"""


def trained_lrs(run_dir) -> set[float]:
    lines = (run_dir / run_files.METRICS_JSONL).read_text().splitlines()
    return {record["lr"] for record in map(json.loads, lines) if "lr" in record}


def test_the_configs_optimizer_wins_over_configure_optimizers_and_says_so(project):
    """The project's config names an optimizer (lr 0.1), as every example config does; the subclass
    builds its own (lr 3e-3). The config's is used, one line says so and how to change it, and
    optimizer=null trains with the subclass's."""
    project.write(MINE, "mine.py")
    proc = in_process("run", "cfg.yaml", "trainer=mine.MyTrainer", "optimizer.lr=1e-5", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    assert notes == ["note: cfg.yaml:18:3: optimizer: of the config is used; mine.MyTrainer.configure_optimizers() "
                     "is not called (to train with it, set optimizer=null)"]
    assert trained_lrs(project.runs / "t") == {1e-5}

    proc = in_process("run", "cfg.yaml", "trainer=mine.MyTrainer", "optimizer=null", "--overwrite",
                      cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert "note:" not in proc.stdout
    assert trained_lrs(project.runs / "t") == {3e-3}


def test_a_configs_scheduler_beside_configure_optimizers(project):
    project.write(MINE, "mine.py")
    project.write(project.text + "scheduler: {_target_: torch.optim.lr_scheduler.StepLR, step_size: 2, "
                              "gamma: 0.5}\n", "scheduled.yaml")
    proc = in_process("run", "scheduled.yaml", "trainer=mine.MyTrainer", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert ("note: scheduled.yaml:18:3: optimizer: and scheduler: of the config are used; "
            "mine.MyTrainer.configure_optimizers() is not called (to train with it, set optimizer=null "
            "scheduler=null)") in proc.stdout.splitlines()
    assert trained_lrs(project.runs / "t") == {0.05, 0.025}  # StepLR halves 0.1 every 2 steps

    # The subclass's optimizer with the config's scheduler: refused, naming the two ways out.
    proc = in_process("run", "scheduled.yaml", "trainer=mine.MyTrainer", "optimizer=null", "name=t2",
                      cwd=project.root)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: scheduled.yaml:20:12: scheduler: with optimizer: null, mine.MyTrainer.configure_optimizers() builds "
        "the optimizer and a scheduler of the config has none to drive: return (optimizer, scheduler) from "
        "configure_optimizers(), or set scheduler=null"]
    assert not [p for p in (project.runs / "t2").rglob("*") if p.name != run_files.LOCK]
