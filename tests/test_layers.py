"""The package's import graph: no cycle, and no arrow from a lower layer to a higher one, counting
imports inside functions (read from the source, nothing is imported)."""

import ast
import collections
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "trainer"

# Low to high, by module or folder (the longest name that matches decides). trainer/__init__.py only
# re-exports, lazily, and is left out.
LAYERS = [
    {"trainer.config", "trainer.hooks", "trainer.device", "trainer.run_dir", "trainer.schedules",
     "trainer.freezing", "trainer.memory", "trainer.yaml_source", "trainer.components",
     "trainer.parallel.distributed", "trainer.parallel.slurm"},
    {"trainer.data"},
    {"trainer.losses", "trainer.parallel"},
    {"trainer.checkpoint", "trainer.observability"},
    {"trainer.loop", "trainer.evaluation", "trainer.callbacks"},
    {"trainer.trainer"},
    {"trainer.cli"},
    {"trainer.examples", "trainer.__main__"},
]


def layer_of(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        prefix = ".".join(parts[:end])
        for i, names in enumerate(LAYERS):
            if prefix in names:
                return i
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, int]]]:
    """Each module's imports of the package's modules, with their lines."""
    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges = collections.defaultdict(set)
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert not node.level, f"{path}:{node.lineno}: a relative import; the package imports absolutely"
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                target = resolve(name) if name.startswith("trainer.") else ""
                if target and target not in (module, "trainer"):
                    edges[module].add((target, node.lineno))
    return edges


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    mods = modules()
    edges = imports(mods)
    assert len(edges) > 40  # the reading found the package's imports
    upward = [f"{m}:{line} imports {t}" for m in sorted(edges) if m != "trainer"
              for t, line in sorted(edges[m]) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_no_import_cycle():
    edges = imports(modules())
    graph = {m: {t for t, _ in targets} for m, targets in edges.items() if m != "trainer"}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(graph.get(current, ()))
        return False

    cycles = sorted((m, t) for m, targets in graph.items() for t in targets if reaches(t, m))
    assert cycles == []


def test_the_check_finds_an_upward_import():
    # The layers catch what they claim to: the Trainer is above its loop's parts.
    assert layer_of("trainer.loop.step") < layer_of("trainer.trainer") < layer_of("trainer.cli.commands")
    assert layer_of("trainer.parallel.distributed") < layer_of("trainer.data.sources") < layer_of("trainer.parallel.strategy")


def private_members(path: Path, class_name: str) -> set[str]:
    """The ``_names`` a class assigns on ``self`` or defines as methods."""
    cls = next(node for node in ast.parse(path.read_text()).body
               if isinstance(node, ast.ClassDef) and node.name == class_name)
    names = {node.name for node in cls.body if isinstance(node, ast.FunctionDef)}
    names |= {node.attr for node in ast.walk(cls) if isinstance(node, ast.Attribute)
              and isinstance(node.value, ast.Name) and node.value.id == "self" and isinstance(node.ctx, ast.Store)}
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def reads_of(names: set[str], source: str) -> list[tuple[int, str]]:
    """Where ``source`` reads one of ``names`` off anything but its own ``self``."""
    return sorted((node.lineno, node.attr) for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.Attribute) and node.attr in names
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")))


def test_no_module_reads_a_private_member_of_the_trainer():
    # The Trainer calls its components; none of them, nor the CLI, reaches back into it.
    private = private_members(PACKAGE / "trainer.py", "Trainer")
    assert {"_telemetry", "_step", "_checkpointer", "_train_epoch"} <= private  # the reading found them
    found = [f"{path.relative_to(ROOT)}:{line} reads .{name}" for module, path in sorted(modules().items())
             if module != "trainer.trainer" for line, name in reads_of(private, path.read_text())]
    assert found == []
    assert reads_of(private, "def f(trainer):\n    return trainer._telemetry\n") == [(2, "_telemetry")]
