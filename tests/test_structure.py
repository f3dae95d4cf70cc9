"""The package's structure: one resolver decides which implementation of each op runs
(prdit_fast.ops.dispatch), explicit requests that cannot run raise, the "auto" defaults
are the documented ones, the public names exist, and no module imports itself back."""
from __future__ import annotations

import ast
import inspect
import logging
import re
import types
from pathlib import Path

import pytest
import torch

import prdit_fast
from prdit_fast.models import LocalDenoiser, create_model
from prdit_fast.ops import dispatch
from prdit_fast.ops.common import triton_importable
from prdit_fast.ops.dispatch import ImplUnavailable, default_impl, resolve

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prdit_fast"
needs_triton = pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")


@pytest.fixture
def no_interpreter(monkeypatch):
    """CPU tensors without the Triton interpreter: Triton cannot run them."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


# --------------------------------------------------------------------------- resolver
def test_explicit_impl_that_cannot_run_raises(no_interpreter):
    x = torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(ImplUnavailable, match=r"unfold3d: impl='triton' cannot run: .*TRITON_INTERPRET"):
        prdit_fast.ops.unfold3d(x, 12, 8, 2, impl="triton")
    module = LocalDenoiser(8, 4)
    tokens, c = torch.randn(1, 3, 8), torch.randn(1, 8)
    for impl in ("triton", "gemm"):
        with pytest.raises(ImplUnavailable, match=f"local_denoiser: impl='{impl}' cannot run"):
            prdit_fast.ops.local_denoiser(tokens, c, module, impl=impl)
    # "auto" runs the reference there, and says so through the same resolver
    assert resolve("unfold3d", "auto", [x]) == "torch"
    assert torch.equal(prdit_fast.ops.unfold3d(x, 12, 8, 2), prdit_fast.models.unfold3d(x, 12, 8, 2))


@needs_triton
def test_explicit_impl_refused_by_the_op_raises():
    """Where Triton runs (here the interpreter), an op's own refusal (a dtype its kernels
    do not cover) still raises for an explicit request and sends "auto" to the reference."""
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    with pytest.raises(ImplUnavailable, match="unfold3d: impl='triton' cannot run: dtypes"):
        prdit_fast.ops.unfold3d(x, 12, 8, 2, impl="triton")
    assert resolve("unfold3d", "auto", [x], refusal="dtypes not covered") == "torch"


def test_unknown_impl_names_are_rejected():
    with pytest.raises(ValueError, match=r"unfold3d: impl must be 'auto' or one of \('torch', 'triton'\)"):
        resolve("unfold3d", "gemm", [torch.empty(1)])
    with pytest.raises(ValueError, match="unknown op"):
        resolve("no_such_op", "auto", [torch.empty(1)])


def _documented_defaults() -> dict[tuple[str, str], str]:
    """The table in prdit_fast.ops.dispatch's docstring: (op row, column) -> implementation."""
    lines = dispatch.__doc__.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("op ") and "CUDA" in line)
    columns = [c.strip() for c in re.split(r"\s{2,}", lines[header].strip())[1:]]
    table = {}
    for line in lines[header + 1:]:
        cells = [c.strip() for c in re.split(r"\s{2,}", line.strip())]
        if len(cells) != len(columns) + 1:
            break
        for column, impl in zip(columns, cells[1:]):
            table[cells[0], column] = impl
    return table


@needs_triton
def test_default_per_device_and_dtype_is_the_documented_one(monkeypatch):
    table = _documented_defaults()
    assert {column for _, column in table} == {"CPU", "CPU + TRITON_INTERPRET=1", "CUDA fp32", "CUDA bf16 / fp16"}
    where = {  # column -> (device, dtypes, interpreter)
        "CPU": ("cpu", (torch.float32, torch.bfloat16), "0"),
        "CPU + TRITON_INTERPRET=1": ("cpu", (torch.float32, torch.bfloat16), "1"),
        "CUDA fp32": ("cuda", (torch.float32,), "0"),
        "CUDA bf16 / fp16": ("cuda", (torch.bfloat16, torch.float16), "0"),
    }
    checked = 0
    for op in dispatch.OP_IMPLS:
        row = op if (op, "CPU") in table else "every other op"
        for column, (device, dtypes, interpret) in where.items():
            monkeypatch.setenv("TRITON_INTERPRET", interpret)
            for dtype in dtypes:
                assert default_impl(op, device, dtype) == table[row, column], (op, column, dtype)
                checked += 1
    assert checked == len(dispatch.OP_IMPLS) * 7


@needs_triton
def test_resolve_auto_follows_the_default_and_logs_once(caplog):
    caplog.set_level(logging.INFO, logger="prdit_fast.ops")
    dispatch._announced.discard(("fold3d", "triton"))
    tokens = torch.randn(1, 8, 1728)
    for _ in range(3):
        assert resolve("fold3d", "auto", [tokens]) == default_impl("fold3d", "cpu", torch.float32) == "triton"
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fold3d runs")]
    assert said == ["fold3d runs triton (default for cpu torch.float32)"]


def test_accelerate_impl_choices_are_checked(no_interpreter):
    model = create_model("PRDiT-XS/12/1", 16)
    with pytest.raises(ValueError, match="impl names ops .*'sr_head'"):
        prdit_fast.accelerate(model, impl={"sr_head": "torch"})
    with pytest.raises(ValueError, match="unfold3d: impl must be"):
        prdit_fast.accelerate(model, impl={"unfold3d": "gemm"})
    with pytest.raises(ValueError, match="impl must be 'auto', 'torch', 'triton' or a mapping"):
        prdit_fast.accelerate(model, impl="gemm")
    fast = prdit_fast.accelerate(model, dtype=torch.float32, impl="triton")
    with pytest.raises(ImplUnavailable, match="unfold3d: impl='triton' cannot run"):
        fast(torch.randn(1, 1, 16, 16, 16), torch.tensor([3]))
    fast = prdit_fast.accelerate(model, dtype=torch.float32, impl="torch")
    with torch.no_grad():
        torch.testing.assert_close(fast(torch.ones(1, 1, 16, 16, 16), torch.tensor([3])),
                                   model(torch.ones(1, 1, 16, 16, 16), torch.tensor([3])))


# --------------------------------------------------------------------------- public names
def test_ops_export_functions():
    from prdit_fast.ops import (
        adaptive_swiglu,
        attention,
        fold3d,
        layernorm_modulate,
        local_denoiser,
        sampler_update,
        unfold3d,
        unpatchify,
    )

    for op in (unfold3d, fold3d, unpatchify, adaptive_swiglu, local_denoiser, sampler_update, attention,
               layernorm_modulate):
        assert isinstance(op, types.FunctionType), op
        assert "impl" in inspect.signature(op).parameters or op is attention, op.__name__


def test_readme_names_exist():
    """Every ``prdit_fast.NAME`` the README's Python examples use is exported."""
    text = (ROOT / "README.md").read_text()
    names = set(re.findall(r"\bprdit_fast\.([A-Za-z_]\w*)\(", text))
    names |= set(re.findall(r"from prdit_fast import ([A-Za-z_]\w*)", text))
    assert {"create_model", "load_checkpoint", "accelerate", "Sampler"} <= names
    missing = sorted(n for n in names if not hasattr(prdit_fast, n))
    assert not missing, f"README uses prdit_fast.{missing} which the package does not export"
    for name in ("keys_for", "Sampler", "FastPRDiT", "IaNDiffusion", "create_model", "load_checkpoint"):
        assert name in prdit_fast.__all__ and callable(getattr(prdit_fast, name))


# --------------------------------------------------------------------------- import graph
# The layers below ``prdit_fast.ops``: plain torch, importing nothing from the package. The
# ops may import these and each other, nothing else of the package (no model, process,
# engine or CLI module), so a kernel file never pulls in the layers built on it.
LOW_LAYER = ("prdit_fast.layout", "prdit_fast.schedules")


def _package_modules(package: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__) for every module under ``package``."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _direct_imports(name: str, path: Path, is_package: bool, modules) -> set[str]:
    """The package modules one module imports anywhere in its body (top level, inside
    functions, under TYPE_CHECKING), read from the source with ast."""
    base = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                anchor = base
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                source = f"{anchor}.{source}" if source else anchor
            if source in modules:
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in modules else source)
    targets.discard(name)
    return targets


def _module_imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module name -> the package modules importing it runs: its direct imports, plus the
    ``__init__`` of every subpackage it enters from outside (importing ``a.ops.sampling``
    from ``a.engine`` first runs ``a/ops/__init__.py`` and everything that imports). The
    top-level package's own ``__init__`` is left out: it runs before any of its modules."""
    modules = _package_modules(package)
    root = package.name
    graph = {}
    for name, (path, is_package) in modules.items():
        targets = _direct_imports(name, path, is_package, modules)
        for target in list(targets):
            parent = target.rpartition(".")[0]
            while parent and parent != root:
                if parent in modules and not (name == parent or name.startswith(parent + ".")):
                    targets.add(parent)
                parent = parent.rpartition(".")[0]
        targets.discard(name)
        graph[name] = targets
    return graph


def _layer_violations(package: Path = PACKAGE) -> list[str]:
    """'importer -> imported' for every import of an ops module that leaves ops and the low
    layer, and every import of a low-layer module from the package."""
    modules = _package_modules(package)
    root = package.name
    ops = f"{root}.ops"
    low = {name.replace("prdit_fast", root, 1) for name in LOW_LAYER}
    found = []
    for name, (path, is_package) in sorted(modules.items()):
        direct = _direct_imports(name, path, is_package, modules)
        if name == ops or name.startswith(ops + "."):
            allowed = lambda target: target == ops or target.startswith(ops + ".") or target in low  # noqa: E731
        elif name in low:
            allowed = lambda target: False  # noqa: E731
        else:
            continue
        found += [f"{name} -> {target}" for target in sorted(direct) if not allowed(target)]
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, stack, found = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle_in_the_package():
    graph = _module_imports()
    assert {"prdit_fast.checkpoint", "prdit_fast.fast", "prdit_fast.ops.dispatch"} <= set(graph)
    assert "prdit_fast.state_dict" in graph["prdit_fast.fast"]  # the helpers that used to close a cycle
    assert "prdit_fast.ops" in graph["prdit_fast.engine"]  # importing ops.sampling runs ops/__init__
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_ops_import_nothing_above_them():
    """prdit_fast.ops imports only ops and the low layer (layout, schedules), which import
    nothing from the package: the layers point down."""
    assert all((ROOT / (name.replace(".", "/") + ".py")).exists() for name in LOW_LAYER)
    violations = _layer_violations()
    assert not violations, "imports that run up the layers: " + "; ".join(violations)


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_scans_see_an_upward_import_inside_a_function(tmp_path):
    """The import that used to run up the layers (an op importing the engine inside a
    function, while the engine imports another op) is a layer violation and, through
    ops/__init__, a cycle; the scans find both."""
    package = _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/layout.py": "import torch\n",
        "pkg/engine.py": "from .ops.sampling import update\n",
        "pkg/ops/__init__.py": "from .sampling import update\nfrom .assemble import assemble\n",
        "pkg/ops/sampling.py": "from .. import layout\n",
        "pkg/ops/assemble.py": "def assemble():\n    from ..engine import volume_to_tokens\n",
    })
    assert _layer_violations(package) == ["pkg.ops.assemble -> pkg.engine"]
    assert _cycles(_module_imports(package)) == [["pkg.engine", "pkg.ops", "pkg.ops.assemble", "pkg.engine"]]


# --------------------------------------------------------------------------- file names
# modules of prdit_fast/ops that are the ops' shared machinery, not ops, and where they are tested
OPS_MACHINERY = {
    "common": "the Triton import and autotune-config helpers: every op's tests",
    "derived": "the derived-weight cache and recompute-in-backward: test_ops_denoiser, test_fast, test_ops_fp8_linear",
    "dispatch": "the resolver: this file",
}
# test_ops_<family>.py / bench_ops_<family>.py that cover several ops at once: family -> its ops
OP_FAMILIES = {
    "rms": ("adaln", "swiglu", "denoiser"),  # TF-PRDiT's RMSNorm form of each
    "memory": ("unfold", "token_cubes", "sampling"),  # the memory-bound ops as bandwidth
}


def test_op_test_and_benchmark_files_are_named_alike():
    """ops/NAME.py is tested in tests/test_ops_NAME.py and benchmarked (where it is) in
    benchmarks/bench_ops_NAME.py: no test or benchmark file carries the name of a module
    that moved."""
    ops = {path.stem for path in (PACKAGE / "ops").glob("*.py")} - {"__init__"}
    tests = {path.stem.removeprefix("test_ops_") for path in (ROOT / "tests").glob("test_ops_*.py")}
    benches = {path.stem.removeprefix("bench_ops_") for path in (ROOT / "benchmarks").glob("bench_ops_*.py")}
    assert set(OPS_MACHINERY) <= ops and all(set(covered) <= ops for covered in OP_FAMILIES.values())
    untested = sorted(ops - set(OPS_MACHINERY) - tests)
    assert not untested, f"ops without tests/test_ops_<name>.py: {untested}"
    for kind, names in (("tests/test_ops_", tests), ("benchmarks/bench_ops_", benches)):
        strays = sorted(names - ops - set(OP_FAMILIES))
        assert not strays, f"{kind}<name>.py files that name no module of prdit_fast/ops: {strays}"


def test_no_module_is_longer_than_800_lines():
    lengths = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert len(lengths) > 50
    long = {name: n for name, n in lengths.items() if n > 800}
    assert not long, f"modules over 800 lines (split them by responsibility): {long}"


def _documented_layers() -> tuple[dict[str, int], set[str]]:
    """docs/architecture.md's layer diagram: package part (top-level module or subpackage)
    -> its row, and the helpers drawn beside every row."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    diagram = text.split("## Layers: who imports whom", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    lines = diagram.splitlines()
    header = next(line for line in lines if "what they are" in line)
    what, beside = header.index("what they are"), header.index("helpers beside")
    parts = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()} - {"__init__", "__pycache__"}
    rows, helpers, row = {}, set(), None
    for line in lines:
        if line[:5].strip().isdigit():
            row = int(line[:5])
        named = [w for w in re.findall(r"[a-z_]+", line[5:what]) if w in parts]
        if line[:5].strip().isdigit() or (row is not None and named and "|" not in line):
            rows.update({name: row for name in named})
        helpers |= {w for w in re.findall(r"[a-z_]+", line[beside:]) if w in parts}
    return rows, helpers


def test_the_architecture_diagram_matches_the_imports():
    """Every top-level module and subpackage stands in one row of docs/architecture.md's
    diagram (or beside it), and imports only its own row, the rows below and the helpers;
    the helpers import only helpers."""
    rows, helpers = _documented_layers()
    graph = _module_imports()
    part = lambda name: name.split(".")[1] if "." in name else None  # noqa: E731 (None: the package itself)
    parts = {part(name) for name in graph} - {None}
    assert not (set(rows) & helpers), set(rows) & helpers
    drawn = set(rows) | helpers
    assert parts == drawn, f"not drawn: {sorted(parts - drawn)}; drawn but absent: {sorted(drawn - parts)}"
    wrong = set()
    for name, targets in graph.items():
        source = part(name)
        for target in map(part, targets):
            if source is None or target in (None, source):
                continue
            if source in helpers:
                ok = target in helpers
            else:
                ok = target in helpers or rows[target] <= rows[source]
            if not ok:
                wrong.add(f"{source} -> {target}")
    assert not wrong, "imports the diagram does not allow: " + ", ".join(sorted(wrong))


# --------------------------------------------------------------------------- checkpoint I/O
# Where checkpoint files are read and written: the reader beside every layer (it imports
# nothing from the package, so the models can read a stage-1 file through it) and the
# package that writes, resolves and loads.
CHECKPOINT_IO_HOMES = ("prdit_fast/checkpoint_read.py", "prdit_fast/checkpoint/")
# The one module that reads a file with torch.load without being a checkpoint reader:
# the MedicalNet ResNet-50 weights are a third-party feature extractor's state dict for
# the metrics, not a PRDiT checkpoint (no config to resolve, no training state, never
# written by us); it reads them with weights_only=True too.
CHECKPOINT_IO_EXCEPTIONS = {"prdit_fast/metrics/medicalnet.py": {"torch.load"}}


def _torch_io_calls(path: Path) -> list[tuple[str, ast.Call]]:
    """(``torch.save`` | ``torch.load``, call node) for every such call in ``path``."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("save", "load") and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"):
            calls.append((f"torch.{node.func.attr}", node))
    return calls


def test_checkpoint_io_only_in_the_checkpoint_modules():
    """Every torch.save / torch.load of the package is in CHECKPOINT_IO_HOMES (the owners
    of checkpoint layouts on disk), apart from CHECKPOINT_IO_EXCEPTIONS above; and
    every torch.load anywhere reads with weights_only=True."""
    outside, loads = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        for name, call in _torch_io_calls(path):
            if name == "torch.load":
                loads += 1
                flags = {k.arg: k.value for k in call.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, (
                    f"{where}:{call.lineno} torch.load without weights_only=True")
            if not where.startswith(CHECKPOINT_IO_HOMES) and name not in CHECKPOINT_IO_EXCEPTIONS.get(where, ()):
                outside.append(f"{where}:{call.lineno} {name}")
    assert not outside, f"checkpoint I/O outside {CHECKPOINT_IO_HOMES}: " + ", ".join(outside)
    assert loads >= 2  # the scan saw the checkpoint readers


def test_the_io_scan_sees_calls(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import torch\ndef f(p):\n    torch.save({}, p)\n    return torch.load(p, weights_only=True)\n")
    assert [name for name, _ in _torch_io_calls(source)] == ["torch.save", "torch.load"]
