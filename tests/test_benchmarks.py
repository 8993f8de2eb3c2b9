"""The benchmarks run: each one's `--tiny` smoke mode, as a user would start it, ends with its JSON line and no
error. (Their figures are for a GPU and go in benchmarks/RESULTS.md; here only that the code paths work.)"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # processes that build a model each, about 50 s in all


def bench(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fps(tmp_path):
    out = tmp_path / "fps.json"
    res = bench("longsana.benchmarks.fps", "--tiny", "--precision", "bf16,fp8", "--chunk-variants", "1", "--json",
                str(out))
    assert res["errors"] == {}, res["errors"]
    assert json.loads(out.read_text()) == res  # saved after each section, the last time whole
    assert res["stream"]["e2e_fps_chunk_1"] > 0  # a stream of 1-latent-frame chunks ran as a variant
    assert all(v > 0 for v in res["stream"]["memory"].values()), res["stream"]["memory"]  # where the memory goes
    st = res["stages"]  # where a chunk's time goes: every stage took time, and the serial time is their sum
    assert all(st[k] > 0 for k in ("transformer_s", "decode_s", "host_copy_s", "uint8_s"))
    assert st["serial_s"] == st["transformer_s"] + st["decode_s"] + st["host_copy_s"]
    assert 0 < st["launch_s"] <= st["transformer_s"]  # (on the CPU the step computes as it is called)
    assert res["fp8"]["step"]["max_x0_err"] < 1e-2  # the FP8 fast step against the FP8 eager step
    fp32, fp8 = res["accuracy"]["fp32"], res["accuracy"]["fp8"]  # on the CPU the benchmark's own model is fp32
    assert max(fp32) == 0 and 0 < max(fp8) < 0.1  # FP8's error against fp32 is reported, and it is FP8's size


def test_switch():
    res = bench("longsana.benchmarks.switch", "--tiny", "--switches", "2")
    assert res["answered"] == res["switches"] == 2
    assert sum(res["stalls_by"].values()) == pytest.approx(res["stalls_s"], abs=2e-3)


@pytest.mark.parametrize("frame, kind", [(0, "start"), (9, "start"), (13, "switch chunk"), (18, "switch chunk"),
                                         (21, "next chunk"), (29, "later"), (33, "later")])
def test_switch_stalls_are_told_by_the_chunk_they_waited_for(frame, kind):
    """The switch benchmark's viewer tells a stall by the chunk of the frame it waited for: a switch's first chunk
    (its pieces too), its second, the stream's own start (before the first switch), or a switch's later chunks."""
    import numpy as np

    from longsana.benchmarks.switch import Viewer
    from longsana.chunk import Chunk

    viewer = Viewer(16)
    viewer.done = True  # (put returns at once)
    for index, start, n, request in [(0, 0, 9, 0), (1, 9, 8, 0), (2, 13, 4, 1), (2, 17, 4, 1), (3, 21, 8, 1),
                                     (4, 29, 8, 1)]:
        viewer.put(Chunk(np.zeros((n, 2, 2, 3), np.uint8), index, start, "p", request, 0.0, request))
    assert viewer.stall_kind(frame) == kind


def test_streams_on_a_machine_of_two_devices():
    res = bench("longsana.benchmarks.streams", "--tiny", "--gpus", "0,1", "--max-streams", "1", "--settle", "1",
                "--paced-seconds", "2")
    assert [len(r) for r in res["rounds"]] == [2]  # one round, both devices at once
    assert all(len(r["streams"]) == 1 and "error" not in r["streams"][0] for r in res["rounds"][0])
    assert res["machine_streams"] == 2 * res["per_gpu"]


def test_frames():
    res = bench("longsana.benchmarks.frames", "--frames", "2", "--height", "16", "--width", "24", "--chunks", "2")
    assert res["bytes"] == 2 * 16 * 24 * 3 and all(len(res[way]["wall_s"]) == 2 for way in ("pickled", "shared memory"))


def test_cuts():
    """The scene-cut measure of the demo's VAE: the rendered cut reads as a cut at once (what makes the VAE's
    figures mean something), and each way gives a frame count or none for each pair."""
    res = bench("longsana.benchmarks.cuts", "--pairs", "2")
    assert res["pairs"] == 2 and res["rendered"] == [0, 0]
    assert all(len(res[way]) == 2 and all(n is None or 0 <= n <= 16 for n in res[way])
               for way in ("round_trip", "spliced"))
