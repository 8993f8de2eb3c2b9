"""Bad input on the command line: each case is one line of error naming the input and the problem, a non-zero exit
status, no traceback, and nothing written or overwritten. `convert` refuses an existing destination unless
--overwrite, and then replaces it whole. Also: importing the command imports no torch (the thread policy must be
set before torch loads)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from longsana.benchmarks.cpu_stream import THREAD_ENV
from longsana.cli import cpu_threads
from longsana.cli import main as cli
from longsana.config import bundled_folder
from longsana.files import check_output, replacing
from longsana.loading import read_state_dict, read_transformer_state_dict

ROOT = Path(__file__).resolve().parent.parent
P = "a red circle moving left"


def fails(args, status: int = 1, *names: str) -> str:
    """Run the command; it must fail with `status` and one line of error that names each of `names`."""
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == status, r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit), r.output
    error = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
    assert len(error) == 1, r.output
    for name in names:
        assert name in error[0], r.output
    return error[0]


@pytest.fixture
def demo(tmp_path) -> Path:
    """A copy of the built-in demo model folder (11 MB), to break."""
    return Path(shutil.copytree(bundled_folder("demo"), tmp_path / "demo"))


# -- generate: options and text files ----------------------------------------------------------------------------


@pytest.mark.parametrize("seconds, message", [
    ("nan", "nan is not a finite number of seconds"), ("inf", "inf is not a finite number of seconds"),
    ("1e308", "1e+308 is too long"), ("-inf", "-inf is not in the range x>=0.0625"),
    ("0", "0.0 is not in the range x>=0.0625"), ("-1", "-1.0 is not in the range x>=0.0625"),
])
def test_seconds_must_be_positive_and_finite(tmp_path, seconds, message):
    out = tmp_path / "a.mp4"
    fails(["generate", "-p", P, "--seconds", seconds, "-o", out], 2, "--seconds", message)
    assert not out.exists()


@pytest.mark.parametrize("option", ["--timeline", "--txt-file"])
def test_text_files_must_be_utf8(tmp_path, option):
    path = tmp_path / "in.txt"
    path.write_bytes(b"0 a red circle\n" + b"3 a caf\xe9 sign\n")  # Latin-1, not UTF-8
    line = fails(["generate", option, path, "-o", tmp_path / "a.mp4", "--out-dir", tmp_path / "v"], 1,
                 f"{path}:2:", "not UTF-8", "0xe9")
    assert "codec" not in line
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("prompt, what", [("a caf\udce9 sign", "byte 0xe9"), ("a \ud800 sign", "U+D800")])
def test_prompt_must_be_utf8(tmp_path, prompt, what):
    """A surrogate escape (what Python makes of a byte that is not UTF-8 in argv) and a lone surrogate."""
    fails(["generate", "-p", prompt, "-o", tmp_path / "a.mp4"], 2, "--prompt", "not valid UTF-8", what)
    assert not (tmp_path / "a.mp4").exists()


def test_prompt_bytes_from_a_real_command_line(tmp_path):
    """The same through a real argv of bytes, `python -m longsana`: the error comes before torch would load."""
    r = subprocess.run([sys.executable, "-m", "longsana", "generate", "-p", b"a caf\xe9 sign", "-o",
                        tmp_path / "a.mp4"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--prompt: not valid UTF-8 text (byte 0xe9 at character 5)" in r.stderr, r.stderr


@pytest.mark.parametrize("option, target", [("-o", "a.mp4"), ("--out-dir", "videos")])
def test_output_under_a_regular_file(tmp_path, option, target):
    (tmp_path / "file").write_text("mine")
    extra = ["--txt-file", tmp_path / "p.txt"] if option == "--out-dir" else ["-p", P]
    (tmp_path / "p.txt").write_text(P + "\n")
    fails(["generate", *extra, "-m", "demo", option, tmp_path / "file" / target], 1,
          str(tmp_path / "file"), "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "mine"


def test_check_output_is_library_code(tmp_path):
    (tmp_path / "f").touch()
    for path, message in [(tmp_path / "f" / "x.mp4", "is a file, not a folder"), (tmp_path, "is a folder")]:
        with pytest.raises(ValueError, match=message):
            check_output(path)
    check_output(tmp_path / "new" / "deeper" / "x.mp4")


# -- generate: a broken model folder --------------------------------------------------------------------------------


def generate_fails(demo: Path, tmp_path: Path, *names: str) -> str:
    out = tmp_path / "a.mp4"
    line = fails(["generate", "-m", demo, "--spec", "demo", "-p", P, "--seconds", "0.5", "-o", out], 1, *names)
    assert not out.exists()
    return line


def test_truncated_text_encoder_weights(demo, tmp_path):
    f = demo / "text_encoder" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    generate_fails(demo, tmp_path, str(demo / "text_encoder"), "cannot load the text encoder's weights")


def test_invalid_text_encoder_config(demo, tmp_path):
    (demo / "text_encoder" / "config.json").write_text('{"model_type": "gemma2",')
    generate_fails(demo, tmp_path, str(demo / "text_encoder" / "config.json"), "not valid JSON")


@pytest.mark.parametrize("part", ["transformer", "vae", "text_encoder"])
def test_config_holding_a_json_array(demo, tmp_path, part):
    (demo / part / "config.json").write_text("[1, 2]")
    generate_fails(demo, tmp_path, str(demo / part / "config.json"), "expected a JSON object {...}, found an array")


# -- generate: a timeline longer than the video ---------------------------------------------------------------------


def test_timeline_segments_not_in_the_video_are_named(tmp_path):
    """Warned, not refused (a short video is how one previews the start of a long timeline): before generating for
    segments past the end; after it for one that a later segment replaces (both land on the same latent frame). A
    segment inside the one chunk is in the video: a switch known ahead cuts the chunk there.
    The demo at 0.5 s: 9 frames at 16 FPS (0.56 s), fewer than its first chunk's 13, so it is one chunk."""
    tl = tmp_path / "tl.txt"
    tl.write_text(f"0 {P}\n0.25 two yellow squares\n0.3 a red star\n3 a blue star\n9 a green circle\n")
    out = tmp_path / "a.mp4"
    r = CliRunner().invoke(cli, ["generate", "--timeline", str(tl), "--seconds", "0.5", "-o", str(out)])
    assert r.exit_code == 0 and out.is_file(), r.output
    assert f"warning: {tl}: the segment(s) starting at 3 s, 9 s are not in the video: they start after the " \
           "video's end (0.56 s)" in r.output
    assert f"warning: {tl}: the segment(s) starting at 0.25 s are not in the video: a later segment lands on the " \
           "same latent frame" in r.output
    assert "0.3 s" not in r.output


# -- convert ----------------------------------------------------------------------------------------------------------


def original_pth(path: Path, seed: int) -> Path:
    """A demo-sized transformer in the original layout (convert's input for a diffusers folder)."""
    from longsana.config import get_config
    from longsana.loading import diffusers_to_original
    from longsana.model import LongSANATransformer
    from longsana.testing import randomize_

    model = randomize_(LongSANATransformer(get_config("demo").transformer), seed)
    torch.save({"state_dict": diffusers_to_original(model.state_dict(), "ref")}, path)
    return path


def convert(*args):
    return CliRunner().invoke(cli, ["convert", *map(str, args), "--config", "demo"])


def test_convert_unknown_config(demo, tmp_path):
    fails(["convert", demo / "transformer", tmp_path / "m.pth", "--config", "bogus"], 2,
          "--config", "unknown config 'bogus'")
    assert not (tmp_path / "m.pth").exists()


@pytest.mark.parametrize("content, message", [
    (None, "saved in torch's legacy format (before torch 1.6)"),
    (b"\x93NUMPY not a checkpoint" * 50, "not a torch checkpoint, or a truncated one"),
])
def test_convert_legacy_or_random_pth(tmp_path, content, message):
    src = tmp_path / "m.pth"
    if content is None:
        torch.save({"a": torch.zeros(2)}, src, _use_new_zipfile_serialization=False)
    else:
        src.write_bytes(content)
    line = fails(["convert", src, tmp_path / "out"], 1, str(src), message)
    assert "mmap" not in line and not (tmp_path / "out").exists()


def test_convert_refuses_an_existing_file_unless_overwrite(demo, tmp_path):
    dst = tmp_path / "m.pth"
    dst.write_bytes(b"keep me")
    fails(["convert", demo, dst], 2, str(dst), "exists; pass --overwrite")
    assert dst.read_bytes() == b"keep me"
    r = convert(demo, dst, "--overwrite")
    assert r.exit_code == 0, r.output
    assert read_state_dict(dst).keys() == read_state_dict(original_pth(tmp_path / "ref.pth", 0)).keys()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_convert_overwrite_replaces_a_sharded_folder_whole(tmp_path):
    """An earlier sharded conversion in DST: refused without --overwrite (the old weights stay), and with it the
    folder holds exactly the new conversion (no old index or shard that would be loaded instead)."""
    old, new, dst = original_pth(tmp_path / "old.pth", 1), original_pth(tmp_path / "new.pth", 2), tmp_path / "out"
    assert convert(old, dst, "--max-shard-size", "100KB").exit_code == 0
    old_files = sorted(p.name for p in dst.iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in old_files and len(old_files) > 3
    fails(["convert", new, dst], 2, str(dst), "exists; pass --overwrite")
    assert sorted(p.name for p in dst.iterdir()) == old_files

    r = convert(new, dst, "--overwrite")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    got, want = read_transformer_state_dict(dst), read_transformer_state_dict(new)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((dst / "config.json").read_text())["num_layers"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.pth", "old.pth", "out"]


def test_convert_refuses_a_destination_holding_its_source(tmp_path):
    (tmp_path / "run").mkdir()
    src = original_pth(tmp_path / "run" / "m.pth", 0)
    fails(["convert", src, tmp_path / "run", "--overwrite"], 2, "holds the source")
    assert src.is_file()


def test_replacing_leaves_the_destination_when_the_write_fails(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.safetensors").write_text("old")
    with pytest.raises(RuntimeError), replacing(dst) as new:
        new.mkdir()
        (new / "half.safetensors").write_text("half")
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in dst.iterdir()] == ["old.safetensors"]
    with replacing(dst) as new:
        new.mkdir()
        (new / "new.safetensors").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in dst.iterdir()] == ["new.safetensors"]


# -- the process settings -------------------------------------------------------------------------------------------


def test_the_command_imports_no_torch():
    """The thread policy is read by torch's OpenMP runtime when torch loads: `longsana.cli` must set it first."""
    code = "import sys, longsana.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60, check=False).returncode == 0


def test_the_command_sets_the_thread_policy_unless_the_user_did(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # so that teardown restores the variable as it was
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert CliRunner().invoke(cli, ["generate", "--help"]).exit_code == 0
    assert os.environ["OMP_NUM_THREADS"] == str(cpu_threads()) and cpu_threads() >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert CliRunner().invoke(cli, ["generate", "--help"]).exit_code == 0
    assert os.environ["OMP_NUM_THREADS"] == "3"


def bench_cpu(busy: int, chunks: int = 8) -> dict:
    """The demo streaming on the CPU in a fresh `python -m longsana bench-cpu` process (the command's entry, thread
    policy included) beside `busy` processes that each keep a core busy; its JSON line."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}  # the policy's own choice, not the suite's
    r = subprocess.run([sys.executable, "-m", "longsana", "bench-cpu", "--chunks", str(chunks), "--reps", "1",
                        "--busy", str(busy)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


# The demo with one core of two busy: 17-22 FPS without the policy (2.4 in the issue), 55-83 with it
# (benchmarks/RESULTS.md). The bar is the product target: over 3x below every run on the shared 2-core CI machine.
BUSY_FPS = 16


@pytest.mark.slow
def test_the_demo_holds_its_frame_rate_beside_a_busy_process():
    result = bench_cpu(busy=1)
    print(f"demo beside a busy process: {result['fps_median']:.1f} FPS, {result['threads']} thread(s)")
    assert result["busy"] == 1 and result["threads"] == cpu_threads()
    assert all(v > 0 for v in result["gflop_per_frame"].values()), result  # the cost card counts both parts
    assert result["fps_median"] >= BUSY_FPS, result


def test_timeline_prompts_are_checked_before_the_video_is_written(tmp_path):
    tl = tmp_path / "tl.txt"
    tl.write_text(f"0 {P}\n0.25 {'x' * 5000}\n")
    fails(["generate", "--timeline", tl, "-o", tmp_path / "a.mp4"], 1, "the segment at 0.25 s", "prompt too long")
    assert not (tmp_path / "a.mp4").exists()
