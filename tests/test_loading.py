"""Checkpoint loading: every official layout loads into our transformer and computes what diffusers computes,
conversion round-trips exactly, bad files fail with messages naming the file and the keys, before any device
memory is touched, and loaded parameters are the memory-mapped file pages themselves (no second copy)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from longsana.cli import main as cli
from longsana.config import DIFFUSERS_CONVENTIONS, TransformerConfig, get_config
from longsana.loading import CheckpointError, _parse_size, diffusers_to_original, load_transformer, read_state_dict
from longsana.testing import diffusers_transformer, rel_err

TINY = dataclasses.replace(get_config("tiny").transformer, **DIFFUSERS_CONVENTIONS)  # 2 layers x 80
OTHER = dataclasses.replace(  # different everything: 3 layers x 72, 4 latent channels, cross heads != self heads
    TransformerConfig(num_heads=3, head_dim=24, num_layers=3, cross_num_heads=2, cross_head_dim=36,
                      caption_channels=20, mlp_ratio=3.0, in_channels=4, out_channels=4), **DIFFUSERS_CONVENTIONS)
IGNORED = {"pos_embed": (1, 10, 80), "y_embedder.y_embedding": (7, 24), "logvar_linear.weight": (1, 80),
           "logvar_linear.bias": (1,)}  # present in official .pth files, unused


@pytest.fixture(scope="module", params=[TINY, OTHER], ids=["tiny", "other"])
def ref(request):
    return diffusers_transformer(request.param, seed=3)


def inputs(cfg: TransformerConfig):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, cfg.in_channels, 3, 4, 6, generator=g)
    y = torch.randn(2, 7, cfg.caption_channels, generator=g)
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    return x, y, torch.tensor([500.0, 731.0]), mask


@torch.no_grad()
def assert_same_output(model, ref):
    x, y, t, mask = inputs(model.cfg)
    want = ref(x, y, t, encoder_attention_mask=mask, return_dict=False)[0]
    assert rel_err(model(x, y, t, mask), want) <= 1e-5


def original_pth(ref, path: Path, container: str) -> dict[str, torch.Tensor]:
    """Save ref's weights as an official .pth, in the original key layout plus the keys loaders must ignore."""
    orig = diffusers_to_original(ref.state_dict(), "ref")
    full = orig | {k: torch.randn(shape) for k, shape in IGNORED.items()}
    torch.save({"state_dict": full} if container == "state_dict" else
               {"generator": {f"model.{k}": v for k, v in full.items()}}, path)
    return orig


# NVlabs name -> diffusers name, written out from diffusers' scripts/convert_sana_video_to_diffusers.py and NVlabs'
# sana_multi_scale_video.py, independently of loading.py's tables.
PUBLISHED_TOP = {
    "x_embedder.proj.weight": "patch_embedding.weight", "x_embedder.proj.bias": "patch_embedding.bias",
    "y_embedder.y_proj.fc1.weight": "caption_projection.linear_1.weight",
    "y_embedder.y_proj.fc1.bias": "caption_projection.linear_1.bias",
    "y_embedder.y_proj.fc2.weight": "caption_projection.linear_2.weight",
    "y_embedder.y_proj.fc2.bias": "caption_projection.linear_2.bias",
    "t_embedder.mlp.0.weight": "time_embed.emb.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "time_embed.emb.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "time_embed.emb.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "time_embed.emb.timestep_embedder.linear_2.bias",
    "t_block.1.weight": "time_embed.linear.weight", "t_block.1.bias": "time_embed.linear.bias",
    "attention_y_norm.weight": "caption_norm.weight", "final_layer.scale_shift_table": "scale_shift_table",
    "final_layer.linear.weight": "proj_out.weight", "final_layer.linear.bias": "proj_out.bias",
}
PUBLISHED_BLOCK = {  # a tuple: concatenated on dim 0 in this order
    "scale_shift_table": "scale_shift_table",
    "attn.qkv.weight": ("attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight"),
    "attn.q_norm.weight": "attn1.norm_q.weight", "attn.k_norm.weight": "attn1.norm_k.weight",
    "attn.proj.weight": "attn1.to_out.0.weight", "attn.proj.bias": "attn1.to_out.0.bias",
    "cross_attn.q_linear.weight": "attn2.to_q.weight", "cross_attn.q_linear.bias": "attn2.to_q.bias",
    "cross_attn.kv_linear.weight": ("attn2.to_k.weight", "attn2.to_v.weight"),
    "cross_attn.kv_linear.bias": ("attn2.to_k.bias", "attn2.to_v.bias"),
    "cross_attn.q_norm.weight": "attn2.norm_q.weight", "cross_attn.k_norm.weight": "attn2.norm_k.weight",
    "cross_attn.proj.weight": "attn2.to_out.0.weight", "cross_attn.proj.bias": "attn2.to_out.0.bias",
    "mlp.inverted_conv.conv.weight": "ff.conv_inverted.weight", "mlp.inverted_conv.conv.bias": "ff.conv_inverted.bias",
    "mlp.depth_conv.conv.weight": "ff.conv_depth.weight", "mlp.depth_conv.conv.bias": "ff.conv_depth.bias",
    "mlp.point_conv.conv.weight": "ff.conv_point.weight", "mlp.t_conv.weight": "ff.conv_temp.weight",
}


def test_original_names_are_the_published_ones(ref):
    """The inverse mapping gives exactly the published names, each holding the right tensor (fused ones in order)."""
    sd = ref.state_dict()
    want = {k: sd[v] for k, v in PUBLISHED_TOP.items()}
    for i in range(ref.config.num_layers):
        for k, v in PUBLISHED_BLOCK.items():
            parts = v if isinstance(v, tuple) else (v,)
            want[f"blocks.{i}.{k}"] = torch.cat([sd[f"transformer_blocks.{i}.{p}"] for p in parts])
    orig = diffusers_to_original(sd, "ref")
    assert orig.keys() == want.keys()
    assert [k for k in want if not torch.equal(orig[k], want[k])] == []


@pytest.mark.parametrize("layout", ["model-folder", "transformer-folder", "sharded", "file"])
def test_diffusers_save_pretrained_loads_and_matches(ref, tmp_path, layout):
    cfg = TINY if ref.config.num_layers == TINY.num_layers else OTHER
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True,
                        max_shard_size="20KB" if layout == "sharded" else "5GB")
    path = {"model-folder": tmp_path, "transformer-folder": tmp_path / "transformer", "sharded": tmp_path,
            "file": tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"}[layout]
    if layout == "sharded":
        assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 2
    model = load_transformer(path, config=cfg, device="cpu")
    assert next(model.parameters()).dtype == torch.float32 and not next(model.parameters()).requires_grad
    assert_same_output(model, ref)


@pytest.mark.parametrize("container", ["state_dict", "generator"])
def test_original_pth_loads_and_matches(ref, tmp_path, container):
    cfg = TINY if ref.config.num_layers == TINY.num_layers else OTHER
    original_pth(ref, tmp_path / "model.pth", container)
    assert_same_output(load_transformer(tmp_path / "model.pth", config=cfg, device="cpu"), ref)


def test_config_comes_from_config_json(tmp_path):
    """Without a config argument the folder's config.json decides the architecture (OTHER is not a named config)."""
    ref = diffusers_transformer(OTHER, seed=1)
    ref.save_pretrained(tmp_path)
    model = load_transformer(tmp_path, device="cpu")
    assert (model.cfg.num_layers, model.cfg.dim, model.cfg.in_channels) == (3, 72, 4)
    # numerical conventions are not in config.json: the original's are the default
    assert model.cfg.linear_attn_eps == TransformerConfig().linear_attn_eps


def test_dtype_selection(tmp_path):
    ref = diffusers_transformer(TINY, seed=2).to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    on_cpu = load_transformer(tmp_path, config=TINY, device="cpu")  # default on the CPU: fp32, even from bf16
    assert {p.dtype for p in on_cpu.parameters()} == {torch.float32}
    w = ref.transformer_blocks[0].attn1.to_q.weight
    assert torch.equal(on_cpu.transformer_blocks[0].attn1.to_q.weight, w.float())
    bf16 = load_transformer(tmp_path, config=TINY, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_convert_round_trip(tmp_path):
    """.pth (generator container) -> sharded diffusers folder that diffusers itself loads -> .pth, all exact."""
    from diffusers import SanaVideoTransformer3DModel

    ref = diffusers_transformer(TINY, seed=4)
    orig = original_pth(ref, tmp_path / "in.pth", "generator")
    run = CliRunner().invoke(cli, ["convert", str(tmp_path / "in.pth"), str(tmp_path / "out"), "--config", "tiny",
                                   "--max-shard-size", "20KB"])
    assert run.exit_code == 0, run.output
    out = tmp_path / "out"
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(out.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 2
    theirs = SanaVideoTransformer3DModel.from_pretrained(out).state_dict()
    want = ref.state_dict()
    assert theirs.keys() == want.keys() and all(torch.equal(theirs[k], want[k]) for k in want)

    run = CliRunner().invoke(cli, ["convert", str(out), str(tmp_path / "back.pth")])
    assert run.exit_code == 0, run.output
    back = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
    assert back.keys() == orig.keys() and all(torch.equal(back[k], orig[k]) for k in orig)


def test_convert_reports_bad_input(tmp_path):
    ref = diffusers_transformer(TINY, seed=5)
    original_pth(ref, tmp_path / "in.pth", "state_dict")
    run = CliRunner().invoke(cli, ["convert", str(tmp_path / "in.pth"), str(tmp_path / "out")])  # default: 2B
    assert run.exit_code != 0
    assert "in.pth" in run.output and "2-layer transformer of hidden size 80" in run.output
    assert "20 layers of hidden size 2240" in run.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--max-shard-size", "5XB"], "Invalid value for --max-shard-size: '5XB' is not a size like 5GB, 300MB or 20KB"),
    (["--config", "nope"], "Invalid value for --config: unknown config 'nope'; known: demo,"),
])
def test_convert_reports_bad_options_in_one_line(tmp_path, args, message):
    original_pth(diffusers_transformer(TINY, seed=5), tmp_path / "in.pth", "state_dict")
    run = CliRunner().invoke(cli, ["convert", str(tmp_path / "in.pth"), str(tmp_path / "out"), *args])
    assert run.exit_code == 2 and message in run.output and "Traceback" not in run.output, run.output


def test_parse_size_is_library_code():
    """It raises ValueError, not a click exception (only the command turns errors into click's)."""
    assert _parse_size("20KB") == 20 << 10 and _parse_size("1.5 GB") == 3 << 29 and _parse_size("123") == 123
    with pytest.raises(ValueError, match="is not a size") as e:
        _parse_size("5XB")
    assert type(e.value) is ValueError


# -- bad input: the message names the file and the keys / shapes, and nothing reached a device -----------------------


def load_fails(path, config=TINY) -> str:
    """load_transformer must raise CheckpointError while still on the CPU: it is asked for a CUDA device, which on a
    CPU-only machine would fail differently if anything were moved, and on a GPU machine must stay untouched."""
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    with pytest.raises(CheckpointError) as e:
        load_transformer(path, config=config, device="cuda")
    if torch.cuda.is_available():
        assert torch.cuda.memory_allocated() == before
    return str(e.value)


def test_missing_shard(tmp_path):
    diffusers_transformer(TINY).save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    shard = sorted(set(index.values()))[1]
    (tmp_path / shard).unlink()
    msg = load_fails(tmp_path)
    assert str(tmp_path / shard) in msg and "shard missing" in msg
    assert min(k for k, s in index.items() if s == shard) in msg  # a key it should hold


def test_truncated_safetensors(tmp_path):
    diffusers_transformer(TINY).save_pretrained(tmp_path)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    msg = load_fails(tmp_path)
    assert str(f) in msg and "safetensors" in msg


def test_truncated_pth(tmp_path):
    original_pth(diffusers_transformer(TINY), tmp_path / "m.pth", "state_dict")
    data = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "m.pth").write_bytes(data[: len(data) // 2])
    assert str(tmp_path / "m.pth") in load_fails(tmp_path / "m.pth")


def test_legacy_and_random_pth(tmp_path):
    """Neither gets torch's "mmap can only be used with files saved with ..." (which blames the saving options of
    any file that is not a zip archive): a legacy-format file is named as such, random bytes as no checkpoint."""
    sd = diffusers_to_original(diffusers_transformer(TINY).state_dict(), "ref")
    torch.save({"state_dict": sd}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    msg = load_fails(tmp_path / "old.pth")
    assert str(tmp_path / "old.pth") in msg and "torch's legacy format" in msg and "mmap" not in msg
    (tmp_path / "r.pth").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    msg = load_fails(tmp_path / "r.pth")
    assert str(tmp_path / "r.pth") in msg and "not a torch checkpoint" in msg and "mmap" not in msg


@pytest.mark.parametrize("text, message", [("[1, 2]", "expected a JSON object {...}, found an array"),
                                           ('{"num_layers": 2,', "not valid JSON"),
                                           (b"\xff\xfe{", "not valid JSON")])
def test_bad_config_json(tmp_path, text, message):
    diffusers_transformer(TINY).save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    msg = load_fails(tmp_path)
    assert str(config) in msg and message in msg


def test_wrong_hidden_size(tmp_path):
    """A .pth of another width: the message says which width and depth the weights have, and which the config."""
    original_pth(diffusers_transformer(OTHER), tmp_path / "m.pth", "state_dict")
    msg = load_fails(tmp_path / "m.pth")  # config TINY: 2 layers x 80; the weights: 3 layers x 72
    assert str(tmp_path / "m.pth") in msg
    assert "3-layer transformer of hidden size 72" in msg and "(72, 4, 1, 2, 2)" in msg
    assert "2 layers of hidden size 80" in msg


def test_config_json_disagrees_with_given_config(tmp_path):
    diffusers_transformer(OTHER).save_pretrained(tmp_path)
    msg = load_fails(tmp_path)
    assert str(tmp_path / "config.json") in msg and "num_layers: given 2, file 3" in msg


def test_wrong_shape(tmp_path):
    """Same width and depth, one tensor of another shape (caption width 20 instead of 24): expected vs found."""
    from safetensors.torch import save_file

    sd = diffusers_transformer(TINY).state_dict()
    sd["caption_projection.linear_1.weight"] = torch.randn(80, 20)
    save_file(sd, tmp_path / "w.safetensors")
    msg = load_fails(tmp_path / "w.safetensors")
    assert str(tmp_path / "w.safetensors") in msg
    assert "caption_projection.linear_1.weight: expected (80, 24), found (80, 20)" in msg


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_unknown_and_missing_keys(tmp_path, layout):
    from safetensors.torch import save_file

    sd = diffusers_transformer(TINY).state_dict()
    if layout == "diffusers":
        sd["transformer_blocks.1.attn1.to_gate.weight"] = torch.randn(80, 80)
        del sd["transformer_blocks.0.ff.conv_temp.weight"]
        save_file(sd, tmp_path / "w.safetensors")
        msg = load_fails(tmp_path / "w.safetensors")
        assert str(tmp_path / "w.safetensors") in msg
        assert "unexpected keys: transformer_blocks.1.attn1.to_gate.weight" in msg
        assert "missing keys: transformer_blocks.0.ff.conv_temp.weight" in msg
    else:
        orig = diffusers_to_original(sd, "ref") | {"blocks.1.attn.gate.weight": torch.randn(80, 80)}
        torch.save({"state_dict": orig}, tmp_path / "m.pth")
        msg = load_fails(tmp_path / "m.pth")
        assert str(tmp_path / "m.pth") in msg
        assert "unknown keys in the original layout: blocks.1.attn.gate.weight" in msg


def test_not_a_state_dict(tmp_path):
    torch.save({"optimizer": {"lr": 0.1}, "step": 3}, tmp_path / "m.pth")
    msg = load_fails(tmp_path / "m.pth")
    assert str(tmp_path / "m.pth") in msg and "optimizer" in msg


# -- no second copy ---------------------------------------------------------------------------------------------------


def file_mappings(paths) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from the given files (Linux /proc/self/maps)."""
    names = {str(Path(p).resolve()) for p in paths}
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in names:
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("layout", ["sharded", "pth"])
def test_parameters_are_the_mapped_file(tmp_path, layout):
    """Loaded in the file's dtype on the CPU, every parameter lies inside a memory mapping of the checkpoint file:
    the module was built without storage (meta) and adopted the file's pages, so the weights exist once."""
    ref = diffusers_transformer(TINY)
    if layout == "sharded":
        ref.save_pretrained(tmp_path, max_shard_size="20KB")
        files = list(tmp_path.glob("*.safetensors"))
    else:
        original_pth(ref, tmp_path / "m.pth", "state_dict")
        files = [tmp_path / "m.pth"]
    model = load_transformer(tmp_path if layout == "sharded" else files[0], config=TINY, device="cpu",
                             dtype=torch.float32)
    ranges = file_mappings(files)
    assert ranges
    outside = [n for n, p in model.named_parameters()
               if not any(lo <= p.data_ptr() and p.data_ptr() + p.nbytes <= hi for lo, hi in ranges)]
    assert not outside, outside
    assert_same_output(model, ref)


def test_read_state_dict_is_mapped_too(tmp_path):
    """The generic reader (used for the VAE as well) hands out mapped tensors, not copies."""
    diffusers_transformer(TINY).save_pretrained(tmp_path)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = read_state_dict(f)
    ranges = file_mappings([f])
    assert all(any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in sd.values())
