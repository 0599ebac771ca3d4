"""The house: import direction, lazy training names, one module of exceptions."""

import ast
import pathlib
import subprocess
import sys

import se_surgery
from se_surgery import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout


def test_import_and_add_se_load_no_training_module():
    out = _run(
        "import sys, torch, torchvision, se_surgery\n"
        "se_surgery.add_se(torchvision.models.resnet18())\n"
        "print(sorted(m for m in sys.modules if m.startswith('se_surgery.train')))\n"
        "se_surgery.load_checkpoint, se_surgery.ClassAwareSampler\n"
        "print('se_surgery.train.loop' in sys.modules, 'se_surgery.train.sampling' in sys.modules)\n"
    )
    assert out.splitlines() == ["[]", "True True"]


def test_training_names_resolve_lazily_to_the_real_objects():
    from se_surgery.train.checkpoint import load_checkpoint
    from se_surgery.train.sampling import ClassAwareSampler

    assert se_surgery.load_checkpoint is load_checkpoint and se_surgery.ClassAwareSampler is ClassAwareSampler
    assert set(se_surgery.__all__) <= set(dir(se_surgery))


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names of the se_surgery modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    else:
        package = package.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("se_surgery")}


def test_surgery_imports_nothing_from_training():
    for path in (ROOT / "se_surgery" / "surgery").glob("*.py"):
        assert not any(m.startswith("se_surgery.train") for m in _imports(path)), path


def test_no_import_cycle_between_modules():
    modules = {}
    for path in (ROOT / "se_surgery").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for m in _imports(path):
            while m and m not in modules:
                m = m.rpartition(".")[0]
            if m and m != name and not name.startswith(m + "."):  # a package's own __init__ is not a cycle
                deps.add(m)
        graph[name] = deps
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail + [node, dep]))
            if dep not in state:
                visit(dep, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_every_exception_raised_by_the_package_is_listed_in_errors():
    listed = set(errors.__all__)
    for path in (ROOT / "se_surgery").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                getattr(b, "id", "").endswith(("Error", "Exception")) for b in node.bases
            ):
                assert path.name == "errors.py", f"{path}: exception {node.name} defined outside se_surgery/errors.py"
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                name = getattr(node.exc.func, "id", None)
                if name and name.endswith("Error") and name not in {"ValueError", "TypeError", "AttributeError",
                                                                    "RuntimeError", "AssertionError", "KeyError"}:
                    assert name in listed, f"{path}: raises {name}, not listed in se_surgery.errors"
    for name in listed:
        assert issubclass(getattr(errors, name), ValueError)


def _edits(a: str, b: str) -> int:
    """Levenshtein distance."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_no_two_sibling_modules_have_near_identical_names():
    """rewrite/rewritten, ablation/ablations: a name that differs from its sibling's by a short suffix or two letters
    does not tell the reader which file holds what."""
    for package in ("se_surgery", "se_surgery/surgery", "se_surgery/train", "analysis", "tests"):
        names = sorted(p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__")
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                suffix = b.startswith(a) and len(b) - len(a) <= 3
                assert not suffix and _edits(a, b) > 2, f"{package}: {a}.py and {b}.py are near-identical names"


def test_no_function_body_in_the_packages_is_over_60_lines():
    """Counted from the first statement after the docstring to the function's last line."""
    long = []
    for package in ("se_surgery", "analysis"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    body = node.body
                    head = getattr(body[0], "value", None)
                    docstring = isinstance(body[0], ast.Expr) and isinstance(head, ast.Constant)
                    first = body[1] if docstring and len(body) > 1 else body[0]
                    if node.end_lineno - first.lineno + 1 > 60:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, long
