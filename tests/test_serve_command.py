"""`longsana serve`'s settings: option defaults are ServerConfig's, a preset (--config, configs/server/*.toml) replaces
them, the command line overrides the preset, and a model that cannot be loaded is one line of error, no traceback.
The server itself is not started: the command's last step is replaced by one that keeps the ServerConfig."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from longsana.cli import main as cli
from longsana.streaming import server
from longsana.streaming.server import ServerConfig, make_pipeline, read_preset


@pytest.fixture
def serve(monkeypatch):
    """Run `longsana serve ARGS` up to the point where it would serve: (exit code, output, ServerConfig or None)."""
    got = {}
    monkeypatch.setattr(server, "make_pipeline", lambda model, *args: f"pipe of {model}")
    monkeypatch.setattr(server, "_serve_forever", lambda pipe, config, open_browser: config)
    monkeypatch.setattr(server, "_run_loop", lambda config: got.update(config=config))

    def run(*args):
        got.clear()
        r = CliRunner().invoke(cli, ["serve", *args])
        return r.exit_code, r.output, got.get("config")

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
