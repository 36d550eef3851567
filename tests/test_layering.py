"""The package's layering, read from the source with ``ast``: no import cycle inside ``wdam_jax``,
``wdam_jax`` never imports ``launch``, ``synthesis`` never imports ``jax`` or ``wdam_jax``, and
the copies that boundary forces agree (the progress reporter, the TFRecord schema, the category
lists)."""

import ast
import pathlib

import numpy as np
import pytest

from wdam_jax.data import datasets, demo, fmas_records
from wdam_jax.data.tf_setup import import_tensorflow

REPO = pathlib.Path(__file__).resolve().parents[1]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _registered_modules(tree: ast.AST) -> set[str]:
    """The modules named by ``"package.module:Class"`` strings (the method registry's entries,
    imported by ``importlib`` on first use: an import the statements do not show)."""
    return {
        node.value.split(":")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.count(":") == 1
        and node.value.split(":")[0].replace(".", "").replace("_", "").isalnum()
        and "." in node.value.split(":")[0]
    }


def imports(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (at any level of the file), counting the
    registry's ``"module:Class"`` strings as imports."""
    modules = {_module_name(p): p for p in (REPO / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        found = {m for m in _registered_modules(tree) if m in modules}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def all_imports(package: str) -> set[str]:
    """Top-level packages any module of ``package`` imports."""
    out = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add(node.module.split(".")[0])
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", ["wdam_jax", "synthesis"])
def test_no_import_cycle(package):
    graph = imports(package)
    assert {"wdam_jax.train", "wdam_jax.methods.cutpaste"} <= set(graph) or (
        {"synthesis.pipeline", "synthesis.distributed", "synthesis.worker"} <= set(graph)
    )
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_registry_strings_count_as_imports():
    graph = imports("wdam_jax")
    assert "wdam_jax.methods.patchcore_method" in graph["wdam_jax.methods.registry"]
    assert find_cycle({**graph, "wdam_jax.methods.cutpaste": {"wdam_jax.train"}}) is not None


def test_methods_never_import_the_loop_the_run_store_or_evaluation():
    graph = imports("wdam_jax")
    above = {"wdam_jax.train", "wdam_jax.runs", "wdam_jax.evaluate", "wdam_jax.predict"}
    for module in (m for m in graph if m.startswith(("wdam_jax.methods.", "wdam_jax.models."))):
        assert not graph[module] & above, (module, graph[module] & above)


def test_the_loop_knows_methods_only_through_the_registry():
    graph = imports("wdam_jax")
    methods = {m for m in graph if m.startswith("wdam_jax.methods.")}
    allowed = {"wdam_jax.methods.base", "wdam_jax.methods.registry"}
    for module in ("wdam_jax.train", "wdam_jax.evaluate"):
        assert graph[module] & methods <= allowed, graph[module] & methods


def test_only_the_realism_analysis_crosses_into_synthesis():
    """Table 2 needs the PyTorch side's FID and LPIPS: one module of ``wdam_jax`` imports
    ``synthesis``, and none imports ``configs`` (configs reach the library as values)."""
    crossing = set()
    for path in (REPO / "wdam_jax").rglob("*.py"):
        tops = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                tops.add(node.module.split(".")[0])
        assert "configs" not in tops, path
        if "synthesis" in tops:
            crossing.add(_module_name(path))
    assert crossing == {"wdam_jax.analysis.realism"}


def test_boundaries():
    assert "launch" not in all_imports("wdam_jax")
    assert not {"jax", "flax", "wdam_jax", "optax"} & all_imports("synthesis")
    assert "torch" not in all_imports("wdam_jax")


def test_boundary_copies_agree():
    # The progress reporter: one implementation, copied byte for byte across the boundary.
    assert (REPO / "synthesis/progress.py").read_text() == (
        REPO / "wdam_jax/progress.py"
    ).read_text()
    # The category lists of the FMAS configs are the readers'.
    from configs import fmas_mvtec, fmas_visa

    assert tuple(fmas_mvtec.MVTEC_CATEGORIES) == tuple(datasets.MVTEC_CATEGORIES)
    assert tuple(fmas_mvtec.DEMO_CATEGORIES) == tuple(demo.DEMO_CATEGORIES)
    assert tuple(fmas_visa.VISA_CATEGORIES) == tuple(datasets.VISA_CATEGORIES)
    # The TFRecord schema the synthesis stage writes is the one the JAX side reads, field by field
    # and kind by kind.
    from synthesis import writer

    tf = import_tensorflow()
    example = tf.train.Example.FromString(
        writer.make_example(
            image=np.zeros((4, 4, 3), np.uint8),
            mask=np.zeros((4, 4), bool),
            source="a/train/good/0.png",
            category="a",
            prompt="p",
            negative_prompt="n",
            prompt_source="library:generic",
            seed=1,
            cfg=5.0,
            strength=0.5,
            lpips=0.1,
            tau=0.13,
        )
    )
    kinds = {k: v.WhichOneof("kind") for k, v in example.features.feature.items()}
    expected = {
        **{k: "bytes_list" for k in fmas_records.STRING_FIELDS},
        **{k: "int64_list" for k in fmas_records.INT_FIELDS},
        **{k: "float_list" for k in fmas_records.FLOAT_FIELDS},
    }
    assert kinds == expected
