"""End to end in a real browser: Debian's headless Chromium driven by Playwright (never a downloaded browser)
against `longsana serve` on CPU. Over WebRTC and over the WebSocket fallback, the page connects, plays and decodes
frames, a prompt typed in the page reaches the generator (the chunks report it and the pixels on screen change),
the overlay shows the switch latency, and the MP4 download holds what was streamed. Where WebRTC cannot connect,
the page falls back to the WebSocket by itself.

The server runs the tiny random-weight model (the real generator, on CPU). The synthetic source, whose colors
are known, checks the pixels on screen in tests/test_server_protocol.py; here `shows` checks them only when
E2E_MODEL is "synthetic".
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright

from longsana.config import get_config
from longsana.streaming.synthetic import SyntheticPipeline, prompt_color
from longsana.text import MAX_PROMPT_CHARS

E2E_MODEL = "tiny"  # a saved tiny random model; "synthetic" for the test source
FPS = (SyntheticPipeline().spec if E2E_MODEL == "synthetic" else get_config(E2E_MODEL)).fps
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
         "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns"]
FOX, OWL = "a red fox trotting through snow", "an owl gliding over a moonlit lake"
MIN_FRAMES = 24

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make setup-test)")]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    if E2E_MODEL == "synthetic":
        model = ["--model", "synthetic", "--height", "240", "--width", "416"]
    else:
        from longsana.testing import save_pipeline, tiny_pipeline

        folder = save_pipeline(tiny_pipeline(), tmp_path_factory.mktemp("tiny"))
        model = ["--model", str(folder), "--spec", E2E_MODEL, "--height", "64", "--width", "64"]
    proc = subprocess.Popen([sys.executable, "-m", "longsana.cli", "serve", *model, "--port", "0", "--ice-loopback"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://\S+", line)
    assert match, f"the server printed {line!r}"
    yield match.group(0)
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def playwright():
    with sync_playwright() as p:
        yield p


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)


def screen_color(page, selector: str) -> np.ndarray:
    """The median color of what `selector` (the video or the canvas) shows now."""
    rgba = page.evaluate("""(selector) => {
        const c = Object.assign(document.createElement("canvas"), {width: 16, height: 8});
        const g = c.getContext("2d");
        g.drawImage(document.querySelector(selector), 0, 0, 16, 8);
        return Array.from(g.getImageData(0, 0, 16, 8).data);
    }""", selector)
    return np.median(np.array(rgba).reshape(-1, 4)[:, :3], axis=0)


def shows(page, selector: str, prompt: str) -> bool:
    return E2E_MODEL != "synthetic" or np.abs(screen_color(page, selector) - prompt_color(prompt)).max() <= 24


def wait_for_color(page, selector: str, prompt: str, timeout_s=5.0) -> None:
    for _ in range(int(timeout_s / 0.1)):
        if shows(page, selector, prompt):
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"{selector} shows {screen_color(page, selector)}, not {prompt!r}'s {prompt_color(prompt)}")


def stats(page) -> dict:
    return page.evaluate("window.longsana")


def stream_and_switch(page, url: str, transport: str, selector: str) -> dict:
    """Start with FOX, switch to OWL from the prompt box; the overlay's numbers and the screen follow."""
    page.goto(f"{url}?transport={transport}")
    max_length = "e => e.maxLength"
    assert page.eval_on_selector("#prompt", max_length) == -1  # no limit written in the page: it comes with hello
    page.fill("#prompt", FOX)
    page.press("#prompt", "Enter")
    page.wait_for_function(f"window.longsana.framesShown >= {MIN_FRAMES}", timeout=30_000)
    assert page.eval_on_selector("#prompt", max_length) == MAX_PROMPT_CHARS and stats(page)["fps"] == FPS
    wait_for_color(page, selector, FOX)
    expect(page.locator("#o-ttff")).to_have_text(re.compile(r"^(\d+ ms|\d+\.\d\d s)$"))

    page.fill("#prompt", OWL)
    page.press("#prompt", "Enter")
    page.wait_for_function("window.longsana.switchMs !== null", timeout=30_000)
    expect(page.locator("#o-switch")).to_have_text(re.compile(r"^(≈ )?(\d+ ms|\d+\.\d\d s)$"))
    s = stats(page)
    assert s["lastChunk"]["prompt"] == OWL and s["lastChunk"]["prompt_seq"] == 1  # it reached the generator
    wait_for_color(page, selector, OWL)
    expect(page.locator("#o-gen")).to_have_text(re.compile(r"^\d+\.\d fps$"))
    expect(page.locator("#o-play")).to_have_text(re.compile(r"^\d+\.\d fps$"))
    assert [li.split("\n")[-1] for li in page.locator("#prompts li").all_inner_texts()] == [FOX, OWL]
    return stats(page)


def check_download(page, tmp_path: Path, shown: int) -> None:
    with page.expect_download() as download:
        page.click("#download")
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    assert path.suffix == ".mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == FPS
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) >= shown
    if E2E_MODEL == "synthetic":
        colors = [np.median(f.reshape(-1, 3), axis=0) for f in frames]
        assert np.abs(colors[0] - prompt_color(FOX)).max() <= 24
        assert np.abs(colors[-1] - prompt_color(OWL)).max() <= 24


def test_webrtc(playwright, url, tmp_path):
    browser = launch(playwright)
    page = browser.new_page(accept_downloads=True)
    errors = []
    page.on("pageerror", lambda e: errors.append(e))
    s = stream_and_switch(page, url, "webrtc", "#video")
    assert s["transport"] == "webrtc" and s["codec"] == "H264" and not s["switchEstimated"]
    decoded = page.evaluate("document.getElementById('video').getVideoPlaybackQuality().totalVideoFrames")
    assert decoded >= MIN_FRAMES
    assert page.text_content("#status") == "live"
    check_download(page, tmp_path, s["framesShown"])
    assert not errors and not s["errors"]
    browser.close()


def test_websocket(playwright, url, tmp_path):
    browser = launch(playwright)
    page = browser.new_page(accept_downloads=True)
    s = stream_and_switch(page, url, "websocket", "#canvas")
    assert s["transport"] == "websocket" and s["codec"] == "JPEG" and not s["switchEstimated"]
    check_download(page, tmp_path, s["framesShown"])
    assert not s["errors"]
    browser.close()


def without_candidates(sdp: str) -> str:
    return "".join(line for line in sdp.splitlines(keepends=True) if not line.startswith("a=candidate"))


def test_falls_back_to_websocket_when_webrtc_cannot_connect(playwright, url):
    """A network where WebRTC cannot connect: the offer and the answer lose their ICE candidates on the way."""
    def block_ice(route):
        offer = json.loads(route.request.post_data)
        response = route.fetch(post_data=json.dumps(dict(offer, sdp=without_candidates(offer["sdp"]))))
        answer = response.json()
        route.fulfill(response=response, json=dict(answer, sdp=without_candidates(answer["sdp"])))

    browser = launch(playwright)
    page = browser.new_page()
    page.route("**/offer", block_ice)
    page.goto(f"{url}?transport=auto")
    page.press("#prompt", "Enter")
    page.wait_for_function(f"window.longsana.framesShown >= {MIN_FRAMES}", timeout=40_000)
    assert stats(page)["transport"] == "websocket"
    assert "using the WebSocket fallback" in page.text_content("#banner")
    wait_for_color(page, "#canvas", page.input_value("#prompt"))
    browser.close()
