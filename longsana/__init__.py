"""LongSANA: real-time streaming long-video generation with a block-causal linear-attention diffusion transformer.

The repository keeps kernels/, streaming/, benchmarks/, web/ and configs/ beside this folder; the wheel installs them
inside it as longsana.kernels, longsana.streaming, longsana.benchmarks, longsana.web and longsana.configs
(pyproject.toml's package-dir).
None of those folders is a package of its own (no __init__.py), so none can shadow an installed package of the same
name (Hugging Face's `kernels`, mosaicml's `streaming`) when Python runs from the repository root. In a checkout
the same names resolve through the folders, by adding the repository root to this package's search path.
"""

from pathlib import Path

__version__ = "0.1.0"

_here = Path(__file__).resolve().parent
if not (_here / "kernels").is_dir() and (_here.parent / "pyproject.toml").is_file():  # a source checkout
    __path__.append(str(_here.parent))
