"""Model configurations: plain dataclasses plus a dict of named configs.

A config says what the network *is* (shapes, epsilons, RoPE table); how it is *run* (chunk size, denoising
timesteps, guidance) lives with the samplers. The named configs are TOML files in the repository's configs/models/
(`get_config("longsana-2b-480p")` reads configs/models/longsana-2b-480p.toml; dropping a file there adds a name),
and an architecture can also be read from a diffusers `transformer/config.json` or `vae/config.json`.

The two numerical conventions that differ between the original NVlabs code and diffusers are explicit fields,
defaulting to the original (the weights were trained with it); tests against diffusers set diffusers' values
(`DIFFUSERS_CONVENTIONS`):
  - `linear_attn_eps`: 1e-8 original, 1e-15 diffusers (denominator of the linear attention)
  - `cross_qk_norm_eps`: 1e-6 original, 1e-5 diffusers (q/k RMSNorm of the cross-attention)
  - `floor_timestep`: the original casts t to an integer, diffusers does not
"""

from __future__ import annotations

import dataclasses
import importlib.resources as resources
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

WAN_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class TransformerConfig:
    in_channels: int = 16
    out_channels: int = 16
    num_heads: int = 20
    head_dim: int = 112
    num_layers: int = 20
    cross_num_heads: int = 20
    cross_head_dim: int = 112
    caption_channels: int = 2304
    mlp_ratio: float = 3.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    norm_eps: float = 1e-6  # the affine-free LayerNorms
    qk_norm_eps: float = 1e-5  # self-attention q/k RMSNorm
    cross_qk_norm_eps: float = 1e-6  # cross-attention q/k RMSNorm (diffusers: 1e-5)
    caption_norm_eps: float = 1e-5
    linear_attn_eps: float = 1e-8  # linear-attention denominator (diffusers: 1e-15)
    rope_max_len: int = 1024  # RoPE table rows per axis
    rope_theta: float = 10000.0
    floor_timestep: bool = True  # the original network casts t to an integer; diffusers feeds it as it is

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        return int(self.mlp_ratio * self.dim)

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Per-axis RoPE channels (t, h, w) of one head: h = w = 2 * (d // 6), t takes the rest."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw

    def __post_init__(self):
        if self.cross_num_heads * self.cross_head_dim != self.dim:
            raise ValueError("cross-attention width must equal the hidden size "
                             f"({self.cross_num_heads}x{self.cross_head_dim} != {self.dim})")
        if self.head_dim % 2 or min(self.rope_split) <= 0 or any(s % 2 for s in self.rope_split):
            raise ValueError(f"head_dim {self.head_dim} gives an unusable RoPE split {self.rope_split}")

    # -- diffusers config.json ------------------------------------------------------------------------------
    _DIFFUSERS_KEYS = {  # ours: diffusers'
        "in_channels": "in_channels", "out_channels": "out_channels", "num_heads": "num_attention_heads",
        "head_dim": "attention_head_dim", "num_layers": "num_layers",
        "cross_num_heads": "num_cross_attention_heads", "cross_head_dim": "cross_attention_head_dim",
        "caption_channels": "caption_channels", "mlp_ratio": "mlp_ratio", "patch_size": "patch_size",
        "norm_eps": "norm_eps", "rope_max_len": "rope_max_seq_len",
    }

    @classmethod
    def from_diffusers(cls, cfg: dict | str | Path, **overrides) -> TransformerConfig:
        """Read a diffusers `SanaVideoTransformer3DModel` config (dict or path to config.json)."""
        if not isinstance(cfg, dict):
            cfg = json.loads(Path(cfg).read_text())
        unsupported = {
            "guidance_embeds": False, "qk_norm": "rms_norm_across_heads", "attention_bias": False,
            "norm_elementwise_affine": False,
        }
        for key, want in unsupported.items():
            if key in cfg and cfg[key] != want:
                raise ValueError(f"unsupported transformer config: {key}={cfg[key]!r} (expected {want!r})")
        dim = cfg.get("num_attention_heads", cls.num_heads) * cfg.get("attention_head_dim", cls.head_dim)
        if cfg.get("cross_attention_dim") not in (None, dim):
            raise ValueError(f"unsupported transformer config: cross_attention_dim={cfg['cross_attention_dim']}")
        kw = {ours: cfg[theirs] for ours, theirs in cls._DIFFUSERS_KEYS.items() if cfg.get(theirs) is not None}
        if "patch_size" in kw:
            kw["patch_size"] = tuple(kw["patch_size"])
        kw.update(overrides)
        return cls(**kw)

    def to_diffusers(self) -> dict:
        """The diffusers config.json content for this architecture."""
        cfg = {theirs: getattr(self, ours) for ours, theirs in self._DIFFUSERS_KEYS.items()}
        cfg["patch_size"] = list(self.patch_size)
        cfg.update(_class_name="SanaVideoTransformer3DModel", cross_attention_dim=self.dim, attention_bias=False,
                   qk_norm="rms_norm_across_heads", guidance_embeds=False, norm_elementwise_affine=False)
        return cfg


DIFFUSERS_CONVENTIONS = dict(linear_attn_eps=1e-15, cross_qk_norm_eps=1e-5, floor_timestep=False)


@dataclass(frozen=True)
class VAEConfig:
    """Wan 2.1 causal VAE (diffusers `AutoencoderKLWan`)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN_LATENTS_STD

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    _DIFFUSERS_KEYS = {"base_dim": "base_dim", "z_dim": "z_dim", "dim_mult": "dim_mult",
                       "num_res_blocks": "num_res_blocks", "temporal_downsample": "temperal_downsample",
                       "latents_mean": "latents_mean", "latents_std": "latents_std"}

    @classmethod
    def from_diffusers(cls, cfg: dict | str | Path) -> VAEConfig:
        if not isinstance(cfg, dict):
            cfg = json.loads(Path(cfg).read_text())
        if cfg.get("attn_scales"):
            raise ValueError(f"unsupported VAE config: attn_scales={cfg['attn_scales']!r}")
        if cfg.get("decoder_base_dim") not in (None, cfg.get("base_dim", cls.base_dim)):
            raise ValueError(f"unsupported VAE config: decoder_base_dim={cfg['decoder_base_dim']!r}")
        kw = {ours: cfg[theirs] for ours, theirs in cls._DIFFUSERS_KEYS.items() if cfg.get(theirs) is not None}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})

    def to_diffusers(self) -> dict:
        cfg = {theirs: getattr(self, ours) for ours, theirs in self._DIFFUSERS_KEYS.items()}
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
        cfg.update(_class_name="AutoencoderKLWan", attn_scales=[], dropout=0.0)
        return cfg


CAUSAL_TIMESTEPS = (1000, 960, 889, 727)  # LongSANA's 4-step causal sampler: sampling.causal_timesteps() (shift 8)


@dataclass(frozen=True)
class ModelSpec:
    """A named model: its architecture, whether it is block-causal, and its sampling defaults."""

    transformer: TransformerConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    causal: bool = True  # block-causal LongSANA (streams chunk by chunk) or the bidirectional base model
    chunk_frames: int = 10  # latent frames per chunk (the first chunk absorbs the remainder)
    denoise_timesteps: tuple[int, ...] = CAUSAL_TIMESTEPS
    motion_score: int = 10
    fps: int = 16  # video frames per second the model was trained for
    height: int = 480  # default video size in pixels
    width: int = 832
    forget_on_switch: bool = False  # a prompt switch drops the attention's memory of the frames before the ones
    # it re-caches (StreamSettings.forget_on_switch)
    switch_chunk_frames: int | None = None  # latent frames of a switch's first chunk (StreamSettings'; None: a chunk)
    piece_frames: int | None = None  # latent frames handed out at a time (StreamSettings'; None: whole chunks)
    weights: str | None = None  # official release name, for messages


# -- named configs: configs/models/<name>.toml ----------------------------------------------------------------------
# The repository's configs/ folder, package data `longsana.configs` in a wheel (pyproject.toml's package-dir).
# A model file holds the ModelSpec fields and [transformer] / [vae] tables, each only where it differs from the
# dataclass defaults above; a new file there is a new name.
CONFIG_FILES = resources.files("longsana.configs")
_PARTS = {"transformer": TransformerConfig, "vae": VAEConfig}


def read_toml(path) -> dict:
    """A TOML file as a dict; ValueError naming the file if it is not valid TOML."""
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None


def _dataclass_from(cls, table, path, name: str | None = None):
    """cls(**table), arrays as tuples; ValueError naming the file for a key that cls does not have."""
    where = f" in [{name}]" if name else ""
    if not isinstance(table, dict):
        raise ValueError(f"{path}: {name} must be a table ([{name}])")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in names:
            raise ValueError(f"{path}: unknown field {key!r}{where}; known: {', '.join(sorted(names))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})


def read_model_config(path) -> ModelSpec:
    """A ModelSpec from a model TOML file (a Path or an importlib.resources Traversable)."""
    data = read_toml(path)
    parts = {k: _dataclass_from(cls, data.pop(k, {}), path, k) for k, cls in _PARTS.items()}
    return _dataclass_from(ModelSpec, data | parts, path)


CONFIGS: dict[str, ModelSpec] = {f.name.removesuffix(".toml"): read_model_config(f)
                                 for f in sorted((CONFIG_FILES / "models").iterdir(), key=lambda f: f.name)
                                 if f.name.endswith(".toml")}

ASSETS = resources.files("longsana") / "assets"  # package data: the built-in models' weights
DEFAULT_CONFIG = "longsana-2b-480p"  # the architecture of a model folder or file that does not say
DEFAULT_MODEL = "demo"  # what `longsana serve` / `generate` use when no model is named
MAX_PROMPT_CHARS = 2000  # longest prompt accepted (checked before tokenizing; the page and the server use it too)
DEFAULT_SECONDS = 5  # clip length when none is given (the base model's clips are this long)


def check_text(text: str, what: str) -> str:
    """`text` if it can be encoded as UTF-8, else ValueError naming `what`: a lone surrogate, which valid JSON can
    hold ("\\ud800") and as which Python hands over a command-line argument's bytes that are not UTF-8
    (U+DC80..U+DCFF), is no text, and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        bad = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"a lone surrogate U+{c:04X}"
        raise ValueError(f"{what}: not valid UTF-8 text ({bad} at character {e.start})") from None
    return text


def bundled_folder(name: str) -> Path | None:
    """The folder of a built-in model whose weights ship with the package, or None."""
    folder = ASSETS / name
    return folder if (folder / "transformer").is_dir() else None


def get_config(name: str) -> ModelSpec:
    """A named config (configs/models/<name>.toml), or a model TOML file given by its path."""
    if name.endswith(".toml"):
        return read_model_config(Path(name))
    try:
        return CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown config {name!r}; known: {', '.join(sorted(CONFIGS))}") from None
