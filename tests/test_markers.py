"""The pytest markers `make test-fast` selects by: registered, and `gpu` on every test that cannot run without CUDA.

A misspelt marker on a test already fails collection (--strict-markers); a misspelt one in the Makefile's -m
expression would silently select the wrong tests, so that is checked here. A test that skips without CUDA but lacks
`gpu` would still run in test-fast on a GPU machine: every such skip must come from longsana.testing.needs_cuda,
which adds the marker. That is checked statically: each skipif condition is evaluated as on machines with and
without CUDA, Triton's interpreter on and off (without a GPU the kernel tests run under it).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import tomllib
from pathlib import Path

import torch

from longsana.testing import needs_cuda

ROOT = Path(__file__).resolve().parents[1]
PYTEST = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
MARKERS = {line.split(":")[0].strip() for line in PYTEST["markers"]}
OPERATORS = {"not", "and", "or"}


def test_strict_markers():
    assert "--strict-markers" in PYTEST["addopts"].split()


def test_the_fast_target_selects_by_registered_markers():
    recipe = re.search(r"^test-fast:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    args = shlex.split(recipe)
    args = args[args.index("pytest"):]  # pytest's own -m, not python's
    expression = args[args.index("-m") + 1]
    assert set(expression.split()) - OPERATORS <= MARKERS, expression
    assert {"slow", "browser", "gpu"} <= set(expression.split())


def test_needs_cuda_marks_gpu_and_skips_without_cuda():
    def test():
        pass

    marks = {m.name: m for m in needs_cuda(test).pytestmark}
    assert set(marks) == {"gpu", "skipif"}
    compiled_cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    assert marks["skipif"].args == (not compiled_cuda,)


class Unknown(Exception):
    """An expression the CUDA check cannot evaluate."""


def cpu_only_skips(source: str) -> list[str]:
    """The skipif conditions in `source` that hold on every machine without CUDA, Triton's interpreter on or off,
    and not on one with CUDA. The conditions are evaluated from the module's own top-level assignments, with
    torch.cuda.is_available() and os.environ.get() answered for each machine; one that mentions CUDA but cannot be
    evaluated so counts as such a skip."""
    tree = ast.parse(source)
    assigned = {s.targets[0].id: s.value for s in tree.body if isinstance(s, ast.Assign)
                and isinstance(s.targets[0], ast.Name)}

    def value(node, cuda, env):
        match node:
            case ast.Constant(value=v):
                return v
            case ast.Name(id=name) if name in assigned:
                return value(assigned[name], cuda, env)
            case ast.UnaryOp(op=ast.Not(), operand=x):
                return not value(x, cuda, env)
            case ast.BoolOp(op=ast.And(), values=xs):
                return all(value(x, cuda, env) for x in xs)
            case ast.BoolOp(op=ast.Or(), values=xs):
                return any(value(x, cuda, env) for x in xs)
            case ast.Compare(left=a, ops=[ast.Eq()], comparators=[b]):
                return value(a, cuda, env) == value(b, cuda, env)
            case ast.Call(func=f, args=[]) if ast.unparse(f) == "torch.cuda.is_available":
                return cuda
            case ast.Call(func=f, args=[ast.Constant(value=key)]) if ast.unparse(f) == "os.environ.get":
                return env.get(key)
        raise Unknown(ast.unparse(node))

    def cuda_only(condition):
        try:
            return (value(condition, False, {}) and value(condition, False, {"TRITON_INTERPRET": "1"})
                    and not value(condition, True, {}))
        except Unknown:
            return "cuda" in ast.unparse(condition).lower()

    conditions = [node.args[0] for node in ast.walk(tree) if isinstance(node, ast.Call) and node.args
                  and isinstance(node.func, ast.Attribute) and node.func.attr == "skipif"]
    return [ast.unparse(c) for c in conditions if cuda_only(c)]


def test_every_cuda_skip_comes_from_needs_cuda():
    found = {path.name: skips for path in sorted((ROOT / "tests").glob("*.py"))
             if (skips := cpu_only_skips(path.read_text()))}
    assert not found, f"use longsana.testing.needs_cuda (it adds the gpu marker) for {found}"


def test_cpu_only_skips_finds_cuda_skips_and_only_those():
    source = """
import os
import pytest
import torch
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETER
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="")
needs_cuda = pytest.mark.skipif(not CUDA, reason="")
runs_triton = pytest.mark.skipif(not (CUDA or INTERPRETER), reason="")
cpu_only = pytest.mark.skipif(CUDA, reason="")
everywhere = pytest.mark.skipif(not CUDA or True, reason="")
unknown = pytest.mark.skipif(not CUDA and unknown_name, reason="")
browser = pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="")
"""
    assert cpu_only_skips(source) == ["not torch.cuda.is_available()", "not CUDA", "not CUDA and unknown_name"]
