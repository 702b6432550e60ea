"""bench and report know no quantizer family: each family reports its own usage statistics through the contract."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_quantizers_contract import CASES, make

import tokkit.quantizers as Q
from tokkit.quantizers import Quantizer, get_quantizer_class, list_quantizers

ROOT = Path(__file__).resolve().parents[1] / "tokkit"
FAMILY_BLIND = ["bench.py", "report.py"]


def _family_words() -> tuple[set[str], set[str], set[str]]:
    """Registry names, family class names and family module names, all read from the registry."""
    classes = {get_quantizer_class(n) for n in list_quantizers()}
    modules = {c.__module__ for c in classes}
    return set(list_quantizers()), {c.__name__ for c in classes}, modules


@pytest.mark.parametrize("filename", FAMILY_BLIND)
def test_bench_and_report_name_no_family(filename: str) -> None:
    src = (ROOT / filename).read_text()
    names, classes, modules = _family_words()
    found = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip().lower() in names:
            found.append(f"line {node.lineno}: the registry name {node.value!r}")
        if isinstance(node, ast.Name) and node.id in classes | {"registry_name"}:
            found.append(f"line {node.lineno}: {node.id}")
        if isinstance(node, ast.Attribute) and node.attr in classes | {"registry_name"}:
            found.append(f"line {node.lineno}: .{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module in modules:
            found.append(f"line {node.lineno}: from {node.module} import ...")
        if isinstance(node, ast.ImportFrom) and node.module == "tokkit.quantizers":
            hit = {a.name for a in node.names} & (classes | {m.rsplit(".", 1)[-1] for m in modules})
            found += [f"line {node.lineno}: imports {h}" for h in sorted(hit)]
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name in modules]
    any_name, any_class = "|".join(sorted(names)), "|".join(sorted(classes))
    patterns = [r"quantizer\s*==", rf"==\s*[\"']({any_name})[\"']", rf"isinstance\([^)]*\b({any_class})\b"]
    for pattern in patterns:
        found += [f"text: {m.group(0)!r}" for m in re.finditer(pattern, src)]
    assert not found, f"{filename} names a quantizer family: {found}"


def _registered_cases() -> list:
    return [pytest.param(n, kw, id=f"{n}-{i}") for n in list_quantizers() for i, kw in enumerate(CASES.get(n, []))]


@pytest.mark.parametrize("name,kwargs", _registered_cases())
def test_every_quantizer_answers_the_usage_contract(name: str, kwargs: dict) -> None:
    q = make(name, kwargs)
    out = q(torch.randn(2, 6, 3, 4))
    zero = q.usage_counts(torch.zeros(0, dtype=torch.int64))
    one = q.usage_counts(out.indices)
    assert isinstance(zero, dict) and set(zero) == set(one)
    for key, value in one.items():
        assert isinstance(value, torch.Tensor) and value.device.type == "cpu", key
        assert value.shape == zero[key].shape and not zero[key].any(), key  # summable, starting from zeros
    total = {k: zero[k] + one[k] + one[k] for k in one}
    report = q.usage_report(total)
    assert isinstance(report, dict)
    json.dumps(report)  # JSON-able as it goes into results.json
    assert not set(report) & {"used", "usage", "perplexity", "entropy_bits", "total", "codebook_size"}


def test_the_base_class_reports_nothing_more() -> None:
    assert Quantizer.usage_counts is Q.VQ.usage_counts and Quantizer.usage_report is Q.VQ.usage_report
    q = make("vq", CASES["vq"][0])
    assert q.usage_counts(torch.tensor([1, 2])) == {} and q.usage_report({}) == {}


def test_family_reports_sum_over_batches() -> None:
    lfq = Q.LFQ(dim=3, codebook_size=8)
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([[1, 2]])
    total = {k: lfq.usage_counts(a)[k] + lfq.usage_counts(b)[k] for k in ("ones", "tokens")}
    bits = lfq.usage_report(total)["bits"]
    assert bits["balance"] == pytest.approx([0.0, 3 / 6, 3 / 6]) and bits["dead"] == [0]
    fsq = Q.FSQ(dim=2, levels=[3, 2])
    counts = fsq.usage_counts(torch.tensor([0, 1, 2, 3, 3]))  # digits (c0, c1): (0,0) (1,0) (2,0) (0,1) (0,1)
    lv = fsq.usage_report(counts)["levels"]
    assert lv["counts"] == [[3, 1, 1], [3, 2]] and lv["used"] == [3, 2]


# ---- module dependencies ---------------------------------------------------------------------------------------------


def imported_modules(path: Path) -> set[str]:
    """Every ``tokkit`` module ``path`` imports, at module level or inside a function (``TYPE_CHECKING`` too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokkit"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # ``from tokkit import report``
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tokkit")}
    return found


def test_bench_and_report_do_not_import_each_other() -> None:
    assert "tokkit.bench" not in imported_modules(ROOT / "report.py")
    assert "tokkit.bench_types" in imported_modules(ROOT / "report.py")
    assert not {"tokkit.bench", "tokkit.report"} & imported_modules(ROOT / "bench_types.py")


def test_result_types_are_still_importable_from_bench() -> None:
    import tokkit.bench_types
    from tokkit.bench import BenchResult, CheckpointResult

    assert BenchResult is tokkit.bench_types.BenchResult and CheckpointResult is tokkit.bench_types.CheckpointResult


def module_level_imports(path: Path) -> set[str]:
    """The ``tokkit`` modules ``path`` imports when it is itself imported: function bodies (run later, if ever) and
    ``if TYPE_CHECKING:`` blocks left out."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        found.update(m for m in _names(node) if m.startswith("tokkit"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _names(node: ast.AST) -> set[str]:
    if isinstance(node, ast.ImportFrom) and node.module:
        return {node.module}
    return {a.name for a in node.names} if isinstance(node, ast.Import) else set()


def test_checkpoint_does_not_import_the_tokenizer() -> None:
    """One direction only: the tokenizer builds on the checkpoint format; the format knows no model.

    The only mention of the tokenizer in checkpoint.py is the module ``__getattr__`` that keeps
    ``tokkit.checkpoint.load`` / ``load_with_meta`` importable from there.
    """
    assert "tokkit.checkpoint" in module_level_imports(ROOT / "models" / "tokenizer.py")
    assert not any(m.startswith("tokkit.models") for m in module_level_imports(ROOT / "checkpoint.py"))
    tree = ast.parse((ROOT / "checkpoint.py").read_text())
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name != "__getattr__"):
        inner = set().union(*(_names(n) for n in ast.walk(fn)))
        assert not any(m.startswith("tokkit.models") for m in inner), f"checkpoint.{fn.name} imports {inner}"


@pytest.mark.parametrize(
    "code",
    [
        "import tokkit.checkpoint, tokkit.models.tokenizer",
        "import tokkit.models.tokenizer, tokkit.checkpoint",
        "from tokkit.checkpoint import load, load_with_meta; import tokkit.models.tokenizer as t;"
        " assert load is t.load and load_with_meta is t.load_with_meta",
        "import tokkit; from tokkit.loading import load; assert tokkit.load is load",
        "import tokkit.report, tokkit.bench",
        "import tokkit.bench, tokkit.report",
    ],
)
def test_imports_in_a_fresh_interpreter(code: str) -> None:
    root = str(ROOT.parent)
    env = {**os.environ, "PYTHONPATH": root}
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
