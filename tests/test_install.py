"""One import name: the repository's folders live inside `longsana` and shadow nothing a user has installed.

transformers imports Hugging Face's `kernels`; a `kernels` package of ours at the repository root would be found
first whenever Python runs from the root (pytest, `python -m`, `python -c`). The wheel itself is checked by
.ci/check-wheel, from outside the checkout.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]

# Run from the repository root, where '' (the root) leads sys.path: transformers must still get Hugging Face's
# kernels, and the model must run on ours.
FROM_THE_ROOT = """
import pathlib, sys
import torch
from transformers import PreTrainedModel
import kernels
import longsana.model as m
from longsana.config import get_config

root = pathlib.Path.cwd().resolve()
assert sys.path[0] == "", sys.path[0]
assert kernels.__file__ and hasattr(kernels, "get_kernel"), f"kernels is not Hugging Face's: {kernels.__path__}"
calls = []
for name, module in (("linear_attention", "linear_attention"), ("ln_modulate", "ln_modulate"),
                     ("add_ln_modulate", "ln_modulate")):
    f = getattr(m, name)
    source = pathlib.Path(sys.modules[f.__module__].__file__).resolve()
    assert f.__module__ == f"longsana.kernels.{module}" and source == root / "kernels" / f"{module}.py", (f, source)
    setattr(m, name, lambda *a, _f=f, _name=name, **kw: calls.append(_name) or _f(*a, **kw))
cfg = get_config("tiny").transformer
with torch.no_grad():
    out = m.LongSANATransformer(cfg).eval()(torch.randn(1, cfg.in_channels, 2, 4, 4),
                                            torch.randn(1, 6, cfg.caption_channels), torch.tensor([500.0]))
assert out.isfinite().all()
print(calls.count("linear_attention"), calls.count("ln_modulate"), calls.count("add_ln_modulate"), cfg.num_layers)
"""


@pytest.mark.slow
def test_transformers_and_our_kernels_from_the_repository_root():
    run = subprocess.run([sys.executable, "-c", FROM_THE_ROOT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    attention, modulate, add_modulate, layers = map(int, run.stdout.split())
    assert (attention, modulate, add_modulate) == (layers, layers, layers)


def test_no_folder_at_the_root_is_a_package_but_longsana():
    """A folder with an __init__.py would be a regular package wherever the root is on sys.path, found before any
    installed package of its name. Without one it is at most a namespace portion, which never shadows."""
    packages = [d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()]
    assert packages == ["longsana"]


def test_every_code_folder_maps_into_longsana():
    folders = {d.name for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".") and any(d.glob("*.py"))}
    folders -= {"longsana", "tests"}  # (hidden folders, .ci or a developer's scratch, hold no package code)
    assert folders == {"kernels", "streaming", "benchmarks"}
    assert PACKAGE_DIR == {"longsana": "longsana", **{f"longsana.{f}": f for f in (*folders, "web", "configs")}}


def test_every_module_imports_under_its_longsana_name():
    for package, folder in PACKAGE_DIR.items():
        for source in sorted((ROOT / folder).glob("*.py")):
            name = package if source.stem == "__init__" else f"{package}.{source.stem}"
            module = importlib.import_module(name)
            assert Path(module.__file__).resolve() == source
