"""The package's house rules, read from the source (imports inside functions included): no import
circle, no import that runs back up a layer, a run half that never reaches the build modules or a
third-party package beyond torch, numpy and tvm-ffi, a product that never imports its benchmark, and
integrations (optional extras: transformers) that nothing else imports."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lean_tvm"
# Each module may import only modules of a lower layer. The run half is layers 0-4 minus the build
# modules; the benchmark package sits on top of everything.
LAYERS = [
    ["lean_tvm.spec", "lean_tvm.softmax", "lean_tvm.library", "lean_tvm.plan", "lean_tvm.reference",
     "lean_tvm.tir_expr"],
    ["lean_tvm.checks", "lean_tvm.merge", "lean_tvm.signature", "lean_tvm.tiles", "lean_tvm.streamk",
     "lean_tvm.compute", "lean_tvm.schedule_records", "lean_tvm.streamk_analysis", "lean_tvm.kv_fp8"],
    ["lean_tvm.attention_cpu", "lean_tvm.attention_gpu", "lean_tvm.gemv", "lean_tvm.codegen", "lean_tvm.runtime",
     "lean_tvm.ragged_sum"],
    ["lean_tvm.paged_ops", "lean_tvm.relax.op", "lean_tvm.streamk_rule"],
    ["lean_tvm.build", "lean_tvm.torch_ops"],
    ["lean_tvm.relax.rewrite", "lean_tvm.relax.kv_cache", "lean_tvm.relax.streamk_pass", "lean_tvm.distributed"],
    ["lean_tvm.relax", "lean_tvm"],
    ["lean_tvm.integrations", "lean_tvm.integrations.transformers.rows", "lean_tvm.integrations.transformers.report"],
    ["lean_tvm.integrations.transformers.mask", "lean_tvm.integrations.transformers.attention"],
    ["lean_tvm.integrations.transformers"],
    ["lean_tvm.bench.grid", "lean_tvm.bench.timing", "lean_tvm.bench.yardstick"],
    ["lean_tvm.bench.report", "lean_tvm.bench.tvm_peer"],
    ["lean_tvm.bench.libraries"],
    ["lean_tvm.bench.systems"],
    ["lean_tvm.bench.suite"],
    ["lean_tvm.bench.targets", "lean_tvm.bench.ncu", "lean_tvm.bench.tune", "lean_tvm.bench.hf_generate",
     "lean_tvm.bench.fp8_accuracy", "lean_tvm.bench.pdl", "lean_tvm.bench.workers",
     "lean_tvm.bench"],
    ["lean_tvm.bench.__main__"],
]
RUN_HALF = {"lean_tvm", "lean_tvm.spec", "lean_tvm.softmax", "lean_tvm.library", "lean_tvm.plan",
            "lean_tvm.reference", "lean_tvm.merge", "lean_tvm.checks", "lean_tvm.runtime", "lean_tvm.paged_ops",
            "lean_tvm.torch_ops", "lean_tvm.distributed"}
BUILD_HALF = {"lean_tvm.signature", "lean_tvm.tiles", "lean_tvm.kv_fp8", "lean_tvm.streamk", "lean_tvm.compute",
              "lean_tvm.schedule_records", "lean_tvm.attention_cpu", "lean_tvm.attention_gpu", "lean_tvm.gemv",
              "lean_tvm.codegen",
              "lean_tvm.build", "lean_tvm.relax", "lean_tvm.relax.op", "lean_tvm.relax.rewrite",
              "lean_tvm.relax.kv_cache", "lean_tvm.relax.streamk_pass", "lean_tvm.tir_expr",
              "lean_tvm.streamk_analysis", "lean_tvm.ragged_sum", "lean_tvm.streamk_rule"}
RUN_HALF_THIRD_PARTY = {"torch", "numpy", "tvm_ffi", "matplotlib"}  # matplotlib: plan's --png only
CPU_FORM_ONLY = {("lean_tvm.runtime", "tvm")}  # the CPU library allocates through TVM's runtime
# A name a module re-exports from a higher layer, imported only inside its module-level
# ``__getattr__`` (PEP 562): resolved on first use, after both modules are loaded, so it makes no
# import-time circle. (module, name, the module its __getattr__ imports the name from.)
LAZY_REEXPORTS = {("lean_tvm.streamk", "StreamK", "lean_tvm.streamk_rule")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports anywhere in its source: lean_tvm modules by full name (a
    ``from pkg import mod`` counts as the module), others by their top-level package."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name if a.name.startswith("lean_tvm") else a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module
            if not target.startswith("lean_tvm"):
                out.add(target.split(".")[0])
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if sub in known else target)
    out.discard(name)
    return out


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    lazy = {(m, t) for m, _, t in LAZY_REEXPORTS}
    return {n: {t for t in imports_of(n, p, set(mods)) if (n, t) not in lazy} for n, p in mods.items()}


def imports_of_module(tree, name: str, target: str) -> int:
    """How many import statements under ``tree`` (of module ``name``) import ``target``."""
    base, found = name.split(".")[:-1], 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            found += any(f"{mod}.{a.name}" == target or mod == target for a in node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found += target in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])
    return found


@pytest.mark.parametrize("module,name,target", sorted(LAZY_REEXPORTS))
def test_a_lazy_reexport_is_imported_only_inside_module_getattr(module, name, target):
    tree = ast.parse(modules()[module].read_text())
    getattrs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
    assert imports_of_module(tree, module, target) == sum(imports_of_module(g, module, target) for g in getattrs) >= 1
    code = (f"import sys, {module} as m; assert {target!r} not in sys.modules, 'imported at load'\n"
            f"got = m.{name}\n"
            f"import {target} as t; assert got is t.{name}; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_every_module_has_a_layer(graph):
    layered = [m for layer in LAYERS for m in layer]
    assert sorted(layered) == sorted(graph), set(graph) ^ set(layered)


def test_no_import_runs_back_up_or_sideways(graph):
    """Layers make the graph acyclic: an import goes strictly down."""
    layer = {m: i for i, names in enumerate(LAYERS) for m in names}
    bad = [(m, t) for m, targets in graph.items() for t in targets if t in layer and layer[t] >= layer[m]]
    assert not bad, bad


def test_no_import_circle(graph):
    internal = {m: {t for t in ts if t in graph} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in internal[m]:
            if state.get(t) == 1:
                raise AssertionError(f"import circle: {' -> '.join([*path, m, t])}")
            if t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for m in internal:
        if m not in state:
            visit(m, [])


def test_the_run_half_reaches_no_build_module_and_only_torch_numpy_tvm_ffi(graph):
    for m in RUN_HALF:
        seen, todo = set(), [m]
        while todo:
            cur = todo.pop()
            for t in graph.get(cur, ()):
                if t.startswith("lean_tvm") and t not in seen:
                    assert t not in BUILD_HALF and not t.startswith("lean_tvm.bench"), (m, "->", cur, "->", t)
                    seen.add(t)
                    todo.append(t)
        third = {t for t in graph[m] if not t.startswith("lean_tvm") and t not in sys.stdlib_module_names}
        extra = {t for t in third - RUN_HALF_THIRD_PARTY if (m, t) not in CPU_FORM_ONLY}
        assert not extra, (m, extra)


def test_the_product_never_imports_its_benchmark(graph):
    bad = [(m, t) for m, ts in graph.items() if not m.startswith("lean_tvm.bench")
           for t in ts if t.startswith("lean_tvm.bench")]
    assert not bad, bad


def test_the_product_never_imports_the_integrations_or_transformers(graph):
    """An integration is an optional extra: the package works without it and without transformers
    (the benchmark, which is not the product, measures it)."""
    bad = [(m, t) for m, ts in graph.items() if not m.startswith(("lean_tvm.integrations", "lean_tvm.bench"))
           for t in ts if t.startswith("lean_tvm.integrations") or t == "transformers"]
    assert not bad, bad


def test_the_import_reader_sees_imports_inside_functions():
    known = set(modules())
    got = imports_of("lean_tvm.bench.tune", ROOT / "bench" / "tune.py", known)
    assert {"lean_tvm.build", "lean_tvm.attention_gpu", "lean_tvm.runtime"} <= got  # all inside functions


def test_import_lean_tvm_without_apache_tvm_or_transformers():
    """A serving box with torch and tvm-ffi only: the package and its run half import."""
    code = ("import sys; sys.modules['tvm'] = None; sys.modules['transformers'] = None\n"
            "import lean_tvm, lean_tvm.runtime, lean_tvm.torch_ops, lean_tvm.distributed, lean_tvm.merge\n"
            "assert 'tvm' not in [m for m in sys.modules if sys.modules[m] is not None and m.split('.')[0] == 'tvm']\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
