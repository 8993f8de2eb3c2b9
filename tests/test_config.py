"""The named model configs (configs/models/*.toml) and the frame rate and causal timesteps they carry.

The expected values below are the Python literals the built-in configs were before they became files: a file
that drifts from them changes a model, which must be a deliberate edit here too.
"""

from __future__ import annotations

import dataclasses
import importlib.resources as resources
import re
import tomllib

import pytest

from longsana.config import (CAUSAL_TIMESTEPS, CONFIGS, ModelSpec, TransformerConfig, VAEConfig, get_config,
                             read_model_config)
from longsana.sampling import causal_timesteps
from longsana.stream import StreamSettings

TWO_B = TransformerConfig()  # the 2B architecture: the dataclass defaults
EXPECTED = {
    "longsana-2b-480p": ModelSpec(TWO_B, causal=True, chunk_frames=10, denoise_timesteps=(1000, 960, 889, 727),
                                  motion_score=10, height=480, width=832, fps=16, switch_chunk_frames=3,
                                  piece_frames=1, weights="Efficient-Large-Model/SANA-Video_2B_480p_LongLive_diffusers"),
    "sana-video-2b-480p": ModelSpec(TWO_B, causal=False, chunk_frames=10, denoise_timesteps=(1000, 960, 889, 727),
                                    motion_score=30, height=480, width=832, fps=16,
                                    weights="Efficient-Large-Model/SANA-Video_2B_480p_diffusers"),
    "tiny": ModelSpec(TransformerConfig(num_heads=2, head_dim=40, num_layers=2, cross_num_heads=2, cross_head_dim=40,
                                        caption_channels=24, mlp_ratio=2.4),
                      VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1), causal=True, chunk_frames=2,
                      denoise_timesteps=(1000, 960, 889, 727), motion_score=10, height=32, width=32, fps=16),
    "demo": ModelSpec(TransformerConfig(num_heads=4, head_dim=32, num_layers=6, cross_num_heads=4, cross_head_dim=32,
                                        caption_channels=64, mlp_ratio=2.5, patch_size=(1, 1, 1)),
                      VAEConfig(base_dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1, latents_mean=(0.0,) * 16,
                                latents_std=(1.0,) * 16),
                      causal=True, chunk_frames=3, denoise_timesteps=(1000, 960, 889, 727), motion_score=10,
                      height=64, width=64, fps=16, forget_on_switch=True),
}
MODELS = resources.files("longsana.configs") / "models"


def test_every_built_in_config_is_what_it_was():
    assert set(CONFIGS) == set(EXPECTED)
    for name, spec in EXPECTED.items():
        assert get_config(name) == spec, name
        assert CONFIGS[name] is get_config(name)


def test_a_models_streaming_choices_are_its_streams_defaults():
    """The 2B model's switch chunk and pieces reach its streams' settings; an override of 0 turns them off (None
    keeps the model's)."""
    spec = get_config("longsana-2b-480p")
    s = StreamSettings.from_spec(spec)
    assert (s.switch_chunk_frames, s.piece_frames, s.forget_on_switch) == (3, 1, False)
    s = StreamSettings.from_spec(spec, piece_frames=0, switch_chunk_frames=None)
    assert (s.switch_chunk_frames, s.piece_frames) == (3, 0)
    assert StreamSettings.from_spec(get_config("demo")).forget_on_switch is True


def test_types_survive_toml():
    """TOML has arrays, not tuples: a list in a frozen config would make it unhashable and unequal to the literal."""
    for spec in CONFIGS.values():
        hash(spec)
        assert all(type(v) is not list for part in (spec, spec.transformer, spec.vae)
                   for v in dataclasses.astuple(part) if not dataclasses.is_dataclass(v))


def test_a_file_lists_only_what_differs_from_the_defaults():
    """One place per default: a model file that repeats a dataclass default would be a second copy of it."""
    for file in MODELS.iterdir():
        if not file.name.endswith(".toml"):
            continue
        data = tomllib.loads(file.read_text())
        for table, cls in ((data, ModelSpec), (data.get("transformer", {}), TransformerConfig),
                           (data.get("vae", {}), VAEConfig)):
            defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
            for key, value in table.items():
                if not isinstance(value, dict):
                    value = tuple(value) if isinstance(value, list) else value
                    assert value != defaults.get(key, ...), (file.name, key)


def test_causal_timesteps_are_one_constant():
    assert CAUSAL_TIMESTEPS == causal_timesteps() == (1000, 960, 889, 727)
    assert ModelSpec(TWO_B).denoise_timesteps == CAUSAL_TIMESTEPS


def test_a_dropped_in_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('weights = "me/mine"\nchunk_frames = 4\nfps = 24\n[transformer]\nnum_layers = 4\n'
                    '[vae]\ndim_mult = [1, 2, 2, 2]\n')
    spec = get_config(str(path))
    assert spec == ModelSpec(TransformerConfig(num_layers=4), VAEConfig(dim_mult=(1, 2, 2, 2)), chunk_frames=4,
                             fps=24, weights="me/mine")


@pytest.mark.parametrize("text,message", [
    ("chunk_frame = 4\n", "unknown field 'chunk_frame'"),
    ("[transformer]\nheads = 4\n", "unknown field 'heads' in [transformer]"),
    ("[vae\n", "not valid TOML"),
])
def test_a_bad_file_names_itself(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"bad\.toml.*{re.escape(message)}"):
        read_model_config(path)


def test_unknown_name():
    with pytest.raises(KeyError, match="unknown config 'nope'; known: demo, longsana-2b-480p"):
        get_config("nope")
