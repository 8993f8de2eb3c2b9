"""Checkpoint loading: read a state dict from any official file layout, check it, assign it into a module.

Files: a single `.safetensors`; a diffusers folder (`diffusion_pytorch_model.safetensors`, or shards plus
`*.safetensors.index.json`); an original `.pth`/`.pt`/`.bin` (a plain state dict, `{"state_dict": ...}`, or a
LongSANA training checkpoint `{"generator": {"model.<key>": ...}}`). Both readers memory-map (safetensors' own mmap
backend, `torch.load(mmap=True)`), so a tensor costs page cache of the file, not a private copy.

Loading never holds the weights twice: modules are built on the meta device, every key and shape is checked
against that meta module on the CPU (a bad file fails before any GPU memory is touched), then each tensor is
moved / cast on its own and `load_state_dict(assign=True)` adopts it as the parameter.

The transformer's two key layouts (diffusers' and the original .pth's) are told apart by their keys; the engine's
module uses the diffusers names, so an original checkpoint is renamed (and its fused qkv / kv weights split) on the
way in. `longsana convert` writes either layout from the other.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import click
import torch
from torch import Tensor, nn

from .config import DEFAULT_CONFIG, TransformerConfig, get_config

if TYPE_CHECKING:
    from .model import LongSANATransformer


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the offending keys."""


# -- reading -----------------------------------------------------------------------------------------------------

TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint file or weights folder, memory-mapped on the CPU.

    Torch containers are unwrapped: `{"state_dict": sd}` -> sd, `{"generator": {"model.<k>": ...}}` -> {k: ...}."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise CheckpointError(f"{path}: unknown checkpoint type (expected .safetensors, {', '.join(TORCH_SUFFIXES)} "
                          "or a folder of them)")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:  # truncated, bad header, unreadable
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


# The first bytes of a checkpoint in torch's legacy format (before torch 1.6; `torch.save(...,
# _use_new_zipfile_serialization=False)`): the pickled magic number that torch.save writes first.
LEGACY_TORCH_HEAD = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


def _read_torch(path: Path) -> dict[str, Tensor]:
    if not zipfile.is_zipfile(path):  # torch.load(mmap=True) would blame the saving options of any such file
        with open(path, "rb") as f:
            legacy = f.read(len(LEGACY_TORCH_HEAD)) == LEGACY_TORCH_HEAD
        if legacy:
            raise CheckpointError(f"{path}: saved in torch's legacy format (before torch 1.6), which cannot be "
                                  "memory-mapped; re-save it once with torch.save(torch.load(path), new_path)")
        raise CheckpointError(f"{path}: not a torch checkpoint, or a truncated one (torch.save writes a zip "
                              "archive; this file is not a complete one)")
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError / zip errors for broken files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj.get("generator"), dict):  # LongSANA training checkpoint: the network is generator.model
        gen = obj["generator"]
        if stray := [k for k in gen if not k.startswith("model.")]:
            raise CheckpointError(f"{path}: 'generator' keys without the 'model.' prefix: {_fmt_keys(stray)}")
        obj = {k.removeprefix("model."): v for k, v in gen.items()}
    if not_tensors := [k for k, v in obj.items() if not isinstance(v, Tensor)]:
        raise CheckpointError(f"{path}: not a state dict; non-tensor entries {_fmt_keys(map(str, not_tensors))} "
                              "(known containers: 'state_dict', 'generator')")
    return obj


def _read_folder(folder: Path) -> dict[str, Tensor]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several shard indexes ({', '.join(p.name for p in indexes)})")
    if indexes:
        return _read_shards(indexes[0])
    files = [p for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", *TORCH_SUFFIXES)]
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "no weights file"
        raise CheckpointError(f"{folder}: expected one weights file or a *.safetensors.index.json, found {found}")
    return read_state_dict(files[0])


def _read_shards(index: Path) -> dict[str, Tensor]:
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a shard index (no 'weight_map' object)")
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    for shard, keys in by_shard.items():  # every shard must exist before any is read
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index.parent / shard}: shard missing (listed in {index.name} for "
                                  f"{len(keys)} keys: {_fmt_keys(keys)})")
    sd: dict[str, Tensor] = {}
    for shard, keys in by_shard.items():
        tensors = _read_safetensors(index.parent / shard)
        if absent := tensors.keys() ^ set(keys):
            raise CheckpointError(f"{index.parent / shard}: its keys differ from what {index.name} lists for it: "
                                  f"{_fmt_keys(absent)}")
        sd.update(tensors)
    return sd


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}


def read_json_object(path: str | Path) -> dict:
    """The object {...} a JSON file holds (a config.json, a shard index); CheckpointError naming the file if it
    cannot be read, is not JSON, or holds anything else."""
    try:
        obj = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object {{...}}, found {JSON_TYPES.get(type(obj), 'other')}")
    return obj


def _fmt_keys(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# -- assigning ---------------------------------------------------------------------------------------------------


def check_state_dict(module: nn.Module, state_dict: dict[str, Tensor], source: str | Path) -> None:
    """Raise CheckpointError unless `state_dict` has exactly the module's keys with the module's shapes."""
    expected = module.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    mismatched = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state_dict[k].shape)}"
                  for k in sorted(expected.keys() & state_dict.keys()) if expected[k].shape != state_dict[k].shape]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched[:8])
                        + (f" ... (+{len(mismatched) - 8} more)" if len(mismatched) > 8 else ""))
    if missing:
        problems.append(f"{len(missing)} missing keys: {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_fmt_keys(unexpected)}")
    if problems:
        raise CheckpointError(f"{source}: does not fit {type(module).__name__}:\n  " + "\n  ".join(problems))


def assign_load(module: nn.Module, state_dict: dict[str, Tensor], source: str | Path, *,
                device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Check `state_dict` against `module` (typically built on the meta device), then adopt its tensors as the
    module's parameters and persistent buffers, moved to `device` and floating tensors cast to `dtype` one at a
    time (None keeps the checkpoint's). Tensors already on `device` in `dtype` are used as they are, no copy."""
    check_state_dict(module, state_dict, source)
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in state_dict.items()}
    module.load_state_dict(sd, strict=True, assign=True)
    return module


# -- transformer key layouts ---------------------------------------------------------------------------------------
# Original NVlabs names -> diffusers names, checked against NVlabs/Sana diffusion/model/nets/sana_multi_scale_video.py
# (SanaMSVideo: x_embedder = PatchEmbedMS3D, t_block = Sequential(SiLU, Linear), blocks[i].attn/.cross_attn/.mlp) and
# diffusers' scripts/convert_sana_video_to_diffusers.py, which pops exactly these keys (attn.qkv chunked in 3 on dim 0
# as q, k, v; cross_attn.kv_linear chunked in 2 as k, v, weight and bias), drops pos_embed, y_embedder.y_embedding and
# logvar_linear.*, and asserts nothing else is left. Module names; the parameter suffix (.weight/.bias) carries over.
ORIGINAL_TOP = {
    "x_embedder.proj": "patch_embedding",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "t_embedder.mlp.0": "time_embed.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_embed.emb.timestep_embedder.linear_2",
    "t_block.1": "time_embed.linear",
    "attention_y_norm": "caption_norm",
    "final_layer.scale_shift_table": "scale_shift_table",
    "final_layer.linear": "proj_out",
}
ORIGINAL_BLOCK = {  # under blocks.{i}. / transformer_blocks.{i}.
    "scale_shift_table": "scale_shift_table",
    "attn.q_norm": "attn1.norm_q",
    "attn.k_norm": "attn1.norm_k",
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.q_norm": "attn2.norm_q",
    "cross_attn.k_norm": "attn2.norm_k",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.inverted_conv.conv": "ff.conv_inverted",
    "mlp.depth_conv.conv": "ff.conv_depth",
    "mlp.point_conv.conv": "ff.conv_point",
    "mlp.t_conv": "ff.conv_temp",
}
ORIGINAL_FUSED = {  # one original tensor = these diffusers tensors concatenated on dim 0
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}
ORIGINAL_IGNORED = ("pos_embed", "y_embedder.y_embedding", "logvar_linear.weight", "logvar_linear.bias")
_BLOCK_KEY = re.compile(r"(blocks|transformer_blocks)\.(\d+)\.(.+)")


def _split_key(key: str) -> tuple[str, str, str]:
    """'blocks.3.attn.qkv.weight' -> ('blocks.3.', 'attn.qkv', '.weight'); top-level keys get an empty head."""
    head, rest = "", key
    if m := _BLOCK_KEY.fullmatch(key):
        head, rest = f"{m[1]}.{m[2]}.", m[3]
    name, dot, suffix = rest.rpartition(".")
    return (head, name, dot + suffix) if suffix in ("weight", "bias") else (head, rest, "")


def is_original_layout(sd: dict[str, Tensor], source: str | Path) -> bool:
    """True for NVlabs key names, False for diffusers names; anything else is an error."""
    original = any(k.startswith(("blocks.", "x_embedder.", "final_layer.")) for k in sd)
    diffusers = any(k.startswith(("transformer_blocks.", "patch_embedding.", "proj_out.")) for k in sd)
    if original == diffusers:
        what = "both" if original else "neither"
        raise CheckpointError(f"{source}: {what} original (blocks.*, x_embedder.*) and diffusers "
                              f"(transformer_blocks.*, patch_embedding.*) transformer keys; first keys: "
                              f"{_fmt_keys(list(sd)[:8])}")
    return original


def original_to_diffusers(sd: dict[str, Tensor], source: str | Path) -> dict[str, Tensor]:
    """Rename an original-layout state dict to diffusers names. Split tensors are views (no copy)."""
    out, unknown = {}, []
    for key, w in sd.items():
        if key in ORIGINAL_IGNORED:
            continue
        head, name, suffix = _split_key(key)
        if head.startswith("blocks.") and name in ORIGINAL_FUSED:
            parts = ORIGINAL_FUSED[name]
            if w.shape[0] % len(parts):
                raise CheckpointError(f"{source}: {key} has shape {tuple(w.shape)}; dim 0 must split in {len(parts)}")
            for part, piece in zip(parts, w.chunk(len(parts), dim=0)):
                out[f"transformer_{head}{part}{suffix}"] = piece
            continue
        new = ORIGINAL_BLOCK.get(name) if head.startswith("blocks.") else None if head else ORIGINAL_TOP.get(name)
        if new is None:
            unknown.append(key)
        else:
            out[f"transformer_{head}{new}{suffix}" if head else new + suffix] = w
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} unknown keys in the original layout: {_fmt_keys(unknown)}")
    return out


def diffusers_to_original(sd: dict[str, Tensor], source: str | Path) -> dict[str, Tensor]:
    """The inverse of `original_to_diffusers` (fused tensors are concatenated, so they are new tensors)."""
    top = {v: k for k, v in ORIGINAL_TOP.items()}
    block = {v: k for k, v in ORIGINAL_BLOCK.items()}
    fused_of = {part: name for name, parts in ORIGINAL_FUSED.items() for part in parts}
    out, unknown, pending = {}, [], {}
    for key, w in sd.items():
        head, name, suffix = _split_key(key)
        orig_head = head.removeprefix("transformer_")
        if head.startswith("transformer_blocks.") and name in fused_of:  # concatenated below, in ORIGINAL_FUSED order
            pending.setdefault(f"{orig_head}{fused_of[name]}{suffix}", {})[name] = w
            continue
        old = block.get(name) if head.startswith("transformer_blocks.") else None if head else top.get(name)
        if old is None:
            unknown.append(key)
        else:
            out[orig_head + old + suffix] = w
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} unknown keys in the diffusers layout: {_fmt_keys(unknown)}")
    for key, got in pending.items():
        parts = ORIGINAL_FUSED[_split_key(key)[1]]
        if absent := [p for p in parts if p not in got]:
            raise CheckpointError(f"{source}: {key} needs {', '.join(parts)}; missing {', '.join(absent)}")
        out[key] = torch.cat([got[p] for p in parts], dim=0)
    return out


def read_transformer_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A transformer checkpoint in either layout, as a diffusers-named state dict."""
    sd = read_state_dict(path)
    return original_to_diffusers(sd, path) if is_original_layout(sd, path) else sd


# -- the transformer -----------------------------------------------------------------------------------------------



def _weights_path(path: Path) -> tuple[Path, Path | None]:
    """(weights file or folder, its config.json or None). A diffusers model folder resolves to transformer/."""
    if path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    config = path / "config.json" if path.is_dir() else None
    return path, config if config and config.is_file() else None


def _resolve_config(config: str | TransformerConfig | None, config_json: Path | None) -> TransformerConfig:
    """The config to build: the given one (checked against the folder's config.json if both exist), else the
    folder's config.json, else the default architecture."""
    if isinstance(config, str):
        config = get_config(config).transformer
    if config_json is None:
        return config or get_config(DEFAULT_CONFIG).transformer
    fields = read_json_object(config_json)
    try:
        from_file = TransformerConfig.from_diffusers(fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_json}: {e}") from e
    if config is None:
        return from_file
    ours, theirs = config.to_diffusers(), from_file.to_diffusers()
    if diff := [f"{k}: given {ours[k]!r}, file {theirs[k]!r}" for k in ours if ours[k] != theirs[k]]:
        raise CheckpointError(f"{config_json}: disagrees with the given config: {'; '.join(diff)}")
    return config


def _check_architecture(sd: dict[str, Tensor], cfg: TransformerConfig, source: str | Path) -> None:
    """Compare hidden size and depth read off the weights with the config, for a message that says which."""
    w = sd.get("patch_embedding.weight")
    layers = 1 + max((int(m[2]) for k in sd if (m := _BLOCK_KEY.fullmatch(k))), default=-1)
    dim = None if w is None else w.shape[0]
    if (dim is not None and dim != cfg.dim) or layers != cfg.num_layers:
        raise CheckpointError(
            f"{source}: the weights are a {layers}-layer transformer of hidden size {dim} (patch_embedding.weight "
            f"{None if w is None else tuple(w.shape)}), but the config asks for {cfg.num_layers} layers of hidden "
            f"size {cfg.dim} ({cfg.num_heads} heads x {cfg.head_dim}); pass the config that matches the weights")


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """CUDA when present; bf16 on a GPU, fp32 on the CPU (bf16 matmuls on a CPU are slow and inexact)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_transformer(path: str | Path, *, config: str | TransformerConfig | None = None, device=None,
                     dtype: torch.dtype | None = None) -> LongSANATransformer:
    """Load a LongSANA / SANA-Video transformer from a diffusers model folder, its `transformer/` folder, a
    safetensors file or an original `.pth` (either key layout). `config` (a name or TransformerConfig) gives the
    architecture where the path has no config.json (default: longsana-2b-480p) and must agree with one that has.
    Numerical conventions (`linear_attn_eps`, ...) are not in config.json: they come from `config`, else the
    original model's defaults. Device: CUDA if present; dtype: bf16 on a GPU, fp32 on the CPU."""
    from .model import LongSANATransformer  # imported here: the VAE / text loaders use this module without it

    path = Path(path)
    weights, config_json = _weights_path(path)
    cfg = _resolve_config(config, config_json)
    sd = read_transformer_state_dict(weights)
    _check_architecture(sd, cfg, weights)
    with torch.device("meta"):
        model = LongSANATransformer(cfg)
    device, dtype = default_device_dtype(device, dtype)
    assign_load(model, sd, weights, device=device, dtype=dtype)  # checks everything before moving anything
    return model.eval().requires_grad_(False)


# -- writing / conversion ----------------------------------------------------------------------------------------

WEIGHTS_NAME = "diffusion_pytorch_model"


def save_diffusers_transformer(sd: dict[str, Tensor], cfg: TransformerConfig, folder: str | Path,
                               max_shard_bytes: int = 5 << 30) -> list[Path]:
    """Write a diffusers transformer folder: config.json plus one safetensors file, or shards of at most
    `max_shard_bytes` (a tensor larger than that gets a shard of its own) with a `.index.json`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_diffusers(), indent=2) + "\n")
    shards: list[list[str]] = [[]]
    size = 0
    for key, w in sd.items():
        if shards[-1] and size + w.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += w.nbytes
    names = [f"{WEIGHTS_NAME}.safetensors"] if len(shards) == 1 else \
        [f"{WEIGHTS_NAME}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        # split qkv / kv views share one storage, which safetensors refuses: copy those (one tensor each)
        save_file({k: sd[k] if sd[k].untyped_storage().nbytes() == sd[k].nbytes else sd[k].clone() for k in keys},
                  folder / name, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(w.nbytes for w in sd.values())},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        (folder / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [folder / n for n in names]


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]?B)?", re.IGNORECASE)


def _parse_size(text: str) -> int:
    """'5GB' / '300MB' / '20KB' / '123' (bytes) -> bytes (powers of 1024); ValueError for anything else."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size like 5GB, 300MB or 20KB")
    return int(float(m[1]) * 1024 ** "BKMG".index((m[2] or "B")[0].upper()))


@click.command("convert")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--config", "config_name", default=None,
              help=f"Architecture of a file without config.json (default {DEFAULT_CONFIG}).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Shard size of a written folder.")
@click.option("--dtype", type=click.Choice(["keep", "bf16", "fp32"]), default="keep", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing DST (all of a folder's content).")
def convert_cmd(src: Path, dst: Path, config_name: str | None, max_shard_size: str, dtype: str, overwrite: bool):
    """Convert a transformer checkpoint SRC between the two key layouts.

    Original layout (a .pth, state_dict or generator checkpoint) -> a diffusers transformer folder DST
    (config.json + safetensors, sharded above --max-shard-size). Diffusers layout (a model folder, its
    transformer/, or a safetensors file) -> an original-layout DST.pth holding {"state_dict": ...}.
    Keys and shapes are checked against the config before anything is written; DST is written beside itself and
    moved into place when complete, so a failed run leaves it as it was."""
    from .files import check_output, replacing
    from .model import LongSANATransformer

    try:
        max_bytes = _parse_size(max_shard_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-shard-size") from None
    to_folder = dst.suffix not in TORCH_SUFFIXES
    if dst.exists() and not overwrite:
        raise click.BadParameter(f"{dst} exists; pass --overwrite to replace it", param_hint="DST")
    if src.resolve() == dst.resolve() or dst.resolve() in src.resolve().parents:
        raise click.BadParameter(f"{dst} holds the source {src}; write elsewhere", param_hint="DST")
    check_output(dst, folder=to_folder)
    weights, config_json = _weights_path(src)
    try:
        cfg = _resolve_config(config_name, config_json)
    except KeyError as e:  # an unknown --config name
        raise click.BadParameter(e.args[0], param_hint="--config") from None
    sd = read_state_dict(weights)
    original = is_original_layout(sd, weights)
    if original:
        sd = original_to_diffusers(sd, weights)
    _check_architecture(sd, cfg, weights)
    with torch.device("meta"):
        check_state_dict(LongSANATransformer(cfg), sd, weights)
    if original != to_folder:
        raise click.BadParameter(f"{dst}: an original-layout checkpoint converts to a diffusers folder, a diffusers "
                                 f"one to a {'/'.join(TORCH_SUFFIXES)} file; {weights} is "
                                 f"{'original' if original else 'diffusers'}", param_hint="DST")
    to_dtype = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    sd = {k: v.to(dtype=to_dtype) for k, v in sd.items()}
    with replacing(dst) as new:
        if original:
            files = save_diffusers_transformer(sd, cfg, new, max_bytes)
        else:
            torch.save({"state_dict": diffusers_to_original(sd, weights)}, new)
    if original:
        click.echo(f"wrote {dst}: diffusers layout, {len(sd)} tensors in {len(files)} file(s)")
    else:
        click.echo(f"wrote {dst}: original layout, {len(sd)} diffusers tensors")
