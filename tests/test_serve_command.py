"""`longsana serve`'s settings: option defaults are ServerConfig's, a preset (--config, configs/server/*.toml) replaces
them, the command line overrides the preset, and a model that cannot be loaded is one line of error, no traceback.
The server itself is not started: the command's last step is replaced by one that keeps the ServerConfig."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from longsana.cli import main as cli
from longsana.streaming import server
from longsana.streaming.gpus import GpuPool
from longsana.streaming.server import ServerConfig, make_pipeline, read_preset


@pytest.fixture
def serve(monkeypatch):
    """Run `longsana serve ARGS` up to the point where it would serve: (exit code, output, ServerConfig or None)."""
    got = {}

    class Pipe:
        def warm_up(self, **stream_kwargs):
            got["warm_up"] = stream_kwargs

    def make_pipeline(model, *args, **kwargs):
        got["pipeline"] = model, *args, kwargs
        return Pipe()

    monkeypatch.setattr(server, "make_pipeline", make_pipeline)
    monkeypatch.setattr(server, "_serve_forever", lambda pipe, config, open_browser: config)
    monkeypatch.setattr(server, "_run_loop", lambda config: got.update(config=config))

    def run(*args):
        got.clear()
        r = CliRunner().invoke(cli, ["serve", *args])
        return r.exit_code, r.output, got.get("config")

    run.got = got
    return run


def test_without_a_preset_the_config_is_the_default(serve):
    code, output, config = serve()
    assert code == 0, output
    assert config == dataclasses.replace(ServerConfig(), model_name="demo")


def test_the_local_preset_is_the_default():
    preset = read_preset("local")
    assert preset and all(getattr(ServerConfig, k) == v for k, v in preset.items()), preset


def test_a_preset_and_the_command_line_over_it(serve, tmp_path):
    code, output, config = serve("--config", "lan")
    assert code == 0, output
    assert config.host == "0.0.0.0" and config.port == ServerConfig.port
    code, output, config = serve("--config", "lan", "--host", "127.0.0.2")
    assert code == 0 and config.host == "127.0.0.2"

    mine = tmp_path / "mine.toml"
    mine.write_text('port = 0\nmax_streams = 3\nmodel = "synthetic"\nstun = ["stun:example.com:3478"]\n'
                    'client_timeout = 30.0\n')
    code, output, config = serve("--max-streams", "1", "--config", str(mine))
    assert code == 0, output
    assert (config.port, config.max_streams, config.model_name, config.ice_servers, config.client_timeout) == (
        0, 1, "synthetic", ("stun:example.com:3478",), 30.0)


@pytest.mark.parametrize("text, message", [
    ("ports = 1\n", "unknown setting(s) ports"),
    ("port = 70000\n", "70000 is not in the range"),
    ("port = \n", "not valid TOML"),
])
def test_a_bad_preset_is_one_line(serve, tmp_path, text, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    code, output, config = serve("--config", str(bad))
    assert code == 2 and message in output and "Traceback" not in output and config is None, output


def test_chunk_settings_reach_the_streams(serve, tmp_path):
    """--chunk-frames, --switch-chunk-frames, --piece-frames (or a preset's) become the streams' settings; out of
    range, or given to the synthetic source, which has none, they are one line of error naming the option."""
    code, output, config = serve("--chunk-frames", "5", "--switch-chunk-frames", "2", "--piece-frames", "1")
    assert code == 0, output
    assert config.stream_kwargs == {"chunk_frames": 5, "switch_chunk_frames": 2, "piece_frames": 1}
    preset = tmp_path / "fast.toml"
    preset.write_text("switch_chunk_frames = 40\n")
    for args, message in [(("--chunk-frames", "0"), "--chunk-frames: chunk_frames must be a number of latent "
                                                      "frames from 1 to 32, got 0"),
                          (("--config", str(preset)), "--switch-chunk-frames: switch_chunk_frames must be")]:
        code, output, config = serve(*args)
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        assert code == 2 and len(errors) == 1 and message in errors[0], output
        assert "Traceback" not in output and config is None, output
    with pytest.raises(server.ConfigError, match="the synthetic source has no piece_frames") as e:
        server.check_stream_kwargs(None, {"height": 64, "piece_frames": 1})
    assert e.value.name == "piece_frames"  # (the command names the option from it, as for the others)


def test_the_model_warms_up_before_it_serves(serve):
    """The pipeline warms up for streams of the server's settings (Pipeline.warm_up) before serving, unless
    --no-warm-up; a size the model cannot make is refused before the model loads."""
    code, output, config = serve("--chunk-frames", "5", "--height", "320")
    assert code == 0 and serve.got["warm_up"] == {"chunk_frames": 5, "height": 320}, output
    code, output, config = serve("--no-warm-up")
    assert code == 0 and "pipeline" in serve.got and "warm_up" not in serve.got, output
    code, output, config = serve("--height", "100")
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert code == 2 and len(errors) == 1 and "--height / --width" in errors[0] and "multiples of 32" in errors[0]
    assert "pipeline" not in serve.got and "Traceback" not in output, output


def test_an_unknown_preset_names_the_known_ones(serve):
    code, output, _ = serve("--config", "nope")
    assert code == 2 and "no server preset 'nope'" in output and "lan, local" in output, output


def test_a_model_that_cannot_load(monkeypatch, tmp_path):
    """make_pipeline raises the loader's own error; the command turns it into one line."""
    with pytest.raises(FileNotFoundError):
        make_pipeline(str(tmp_path / "nope"))
    monkeypatch.setattr(server, "_serve_forever", lambda *args: pytest.fail("the server started"))
    r = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "nope" in r.output and "Traceback" not in r.output, r.output


# -- --gpus ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpus, message", [
    ("0,,1", "'0,,1' has an empty entry"), ("0,", "'0,' has an empty entry"), ("0+", "has an empty entry"),
    ("a", "'a' is not a GPU index"), ("-1", "'-1' is not a GPU index"), ("1.5", "'1.5' is not a GPU index"),
    ("0,1,0", "GPU 0 is listed twice"), ("0+0", "GPU 0 is listed twice"), ("0+1,1+2", "GPU 1 is listed twice"),
    ("0+1+2", "a worker spans at most 2 GPUs"),
])
def test_bad_gpus_are_one_line(serve, gpus, message):
    code, output, config = serve("--model", "synthetic", "--gpus", gpus)
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "--gpus" in errors[0], output
    assert "Traceback" not in output and config is None, output


@pytest.mark.parametrize("count, gpus, message", [
    (0, "0", "no CUDA GPU 0 on this machine: it has none"),
    (2, "0,2", "no CUDA GPU 2 on this machine: it has 2 (0, 1)"),
    (2, "1+2", "no CUDA GPU 2 on this machine"),
])
def test_gpus_this_machine_lacks(serve, monkeypatch, count, gpus, message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    code, output, config = serve("--gpus", gpus)
    assert code == 2 and message in output and "Traceback" not in output and config is None, output
    code, output, config = serve("--gpus", "0", "--device", "cpu")
    assert code == 2 and "--gpus names the devices: leave out --device" in output, output


def test_one_gpu_runs_in_process(serve, monkeypatch):
    """One GPU, or one pair, is a pipeline in this process, on those devices: no worker process."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    code, output, config = serve("--gpus", "3")
    assert code == 0 and config.max_streams == ServerConfig.max_streams, output
    assert serve.got["pipeline"] == ("demo", "cuda:3", None, None, {"vae_device": None})
    code, output, config = serve("--gpus", "2+1")
    assert code == 0 and serve.got["pipeline"] == ("demo", "cuda:2", None, None, {"vae_device": "cuda:1"}), output


def test_synthetic_workers_need_no_gpu(monkeypatch):
    """`--model synthetic --gpus 0,1` starts two synthetic worker processes on any machine; --max-streams is per
    worker; the workers stop when the command ends."""
    got = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(server, "_serve_forever", lambda pipe, config, open_browser: (pipe, config))
    monkeypatch.setattr(server, "_run_loop", lambda served: got.update(zip(("pipe", "config"), served)))
    r = CliRunner().invoke(cli, ["serve", "--model", "synthetic", "--gpus", "0,1", "--max-streams", "3"])
    assert r.exit_code == 0, r.output
    pool = got["pipe"]
    assert isinstance(pool, GpuPool) and [w.name for w in pool.workers] == ["0", "1"] and pool.max_streams == 3
    assert got["config"].max_streams == 6
    assert all(w.process.exitcode is not None for w in pool.workers)  # stopped
