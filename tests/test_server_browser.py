"""End to end in a real browser: Debian's headless Chromium driven by Playwright (never a downloaded browser)
against `longsana serve` on CPU. Over WebRTC and over the WebSocket fallback, the page connects, plays and decodes
frames, a prompt typed in the page reaches the generator (the chunks report it and the pixels on screen change),
the overlay shows the switch latency, and the MP4 download holds what was streamed. Where WebRTC cannot connect,
the page falls back to the WebSocket by itself within seconds, with the controls of a live stream. Stop ends the
stream and leaves the page ready for the next; the recording stays downloadable for the time the server keeps it,
then the page says it is gone; the transport menu reconnects a live stream on the chosen transport.

The built-in demo model, served in-process with a short recording retention, shows what the page offers for a
model with a small vocabulary (examples, its words), on a phone-sized screen (a screenshot is kept in
test-artifacts/).

The server runs the tiny random-weight model (the real generator, on CPU). The synthetic source, whose colors
are known, checks the pixels on screen in tests/test_server_protocol.py; here `shows` checks them only when
E2E_MODEL is "synthetic".
"""

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright

from longsana.config import get_config
from longsana.streaming.guide import DEMO_EXAMPLES, prompt_guide
from longsana.streaming.server import ServerConfig, ServerThread
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
FALLBACK_BUDGET_MS = 5000  # Enter to the first WebSocket frame where WebRTC cannot connect
DEMO_KEEP_SECONDS = 4  # the demo server's recording retention
PHONE = {"width": 390, "height": 844}
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

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
def demo_url():
    """The built-in demo model (64x64), in this process, keeping recordings DEMO_KEEP_SECONDS."""
    from longsana.stream import Pipeline

    config = ServerConfig(port=0, ice_loopback=True, model_name="demo", recording_keep_seconds=DEMO_KEEP_SECONDS)
    with ServerThread(Pipeline.from_pretrained("demo", device="cpu"), config) as server:
        yield server.url


@pytest.fixture(scope="module")
def playwright():
    with sync_playwright() as p:
        yield p


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)


def idle(url: str, timeout_s: float = 30.0) -> str:
    """`url` once the module's server holds no stream: an earlier test's may linger (a WebRTC connection that never
    connected is dropped after the client timeout) and hold a slot this test needs."""
    for _ in range(int(timeout_s / 0.2)):
        with urllib.request.urlopen(url + "health", timeout=10) as r:
            if json.loads(r.read())["streams"] == 0:
                return url
        time.sleep(0.2)
    raise AssertionError(f"the server still holds a stream after {timeout_s:g} s")


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


def stream_and_switch(page, url: str, transport: str, selector: str, blend: str = "0") -> dict:
    """Start with FOX, switch to OWL from the prompt box (with the "Switch" menu's `blend` seconds); the overlay's
    numbers and the screen follow."""
    page.goto(f"{url}?transport={transport}")
    page.select_option("#transition", blend)
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
    sent = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(payload)))
    s = stream_and_switch(page, url, "websocket", "#canvas", blend="2")
    assert s["transport"] == "websocket" and s["codec"] == "JPEG" and not s["switchEstimated"]
    switches = [m for m in map(json.loads, filter(lambda p: isinstance(p, str), sent)) if m["type"] == "prompt"]
    assert [(m["prompt"], m["transition"]) for m in switches] == [(OWL, 2)]  # the menu's blend went with it
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
    expect(page.locator("#prompt")).not_to_have_value("")  # the default prompt, from the server
    page.press("#prompt", "Enter")
    page.wait_for_function(f"window.longsana.framesShown >= {MIN_FRAMES}", timeout=40_000)
    s = stats(page)
    assert s["transport"] == "websocket"
    assert "using the WebSocket fallback" in page.text_content("#banner")
    assert s["ttffMs"] < FALLBACK_BUDGET_MS, f"first WebSocket frame {s['ttffMs']:.0f} ms after Enter"
    # the controls of a live stream
    assert page.text_content("#status") == "live" and page.text_content("#go") == "Switch"
    assert page.is_enabled("#stop") and page.is_enabled("#pause")
    wait_for_color(page, "#canvas", page.input_value("#prompt"))
    browser.close()


def test_stop_then_download_after_the_end_then_start_again(playwright, url, tmp_path):
    idle(url)
    browser = launch(playwright)
    page = browser.new_page(accept_downloads=True)
    offers = []
    page.on("request", lambda r: r.url.endswith("/offer") and offers.append(json.loads(r.post_data)))
    page.goto(f"{url}?transport=webrtc")
    page.fill("#prompt", FOX)
    page.fill("#seed", "7")
    page.press("#prompt", "Enter")
    page.wait_for_function(f"window.longsana.framesShown >= {MIN_FRAMES}", timeout=30_000)
    assert offers[-1]["seed"] == 7 and offers[-1]["prompt"] == FOX
    assert page.text_content("#go") == "Switch" and page.is_enabled("#stop")

    page.click("#stop")
    page.wait_for_function("window.longsana.state === 'ended'", timeout=10_000)
    shown = stats(page)["framesShown"]
    expect(page.locator("#banner")).to_contain_text("stopped by the client")
    assert page.text_content("#go") == "Start" and not page.is_enabled("#stop") and not page.is_enabled("#pause")
    expect(page.locator("#download-note")).to_have_text("Kept for 5 min")  # ServerConfig's 300 s
    page.wait_for_timeout(1500)  # the stream is over on the server too: the recording is its whole
    check_download(page, tmp_path, shown)

    page.fill("#prompt", OWL)  # ready to start again
    page.press("#prompt", "Enter")
    page.wait_for_function("window.longsana.framesShown >= 8", timeout=30_000)
    s = stats(page)
    assert s["state"] == "live" and s["lastChunk"]["prompt"] == OWL and page.text_content("#go") == "Switch"
    assert not s["errors"]
    browser.close()


def test_transport_menu_reconnects_a_live_stream(playwright, url):
    idle(url)
    browser = launch(playwright)
    page = browser.new_page()
    page.goto(f"{url}?transport=webrtc")
    page.fill("#prompt", FOX)
    page.press("#prompt", "Enter")
    page.wait_for_function("window.longsana.framesShown >= 8", timeout=30_000)
    page.fill("#prompt", OWL)
    page.press("#prompt", "Enter")
    page.wait_for_function(f"window.longsana.lastChunk.prompt === {json.dumps(OWL)}", timeout=30_000)
    first = stats(page)["session"]

    for transport in ("websocket", "webrtc"):
        page.select_option("#transport", transport)
        page.wait_for_function(f"window.longsana.transport === '{transport}' && window.longsana.framesShown >= 8",
                               timeout=30_000)
        s = stats(page)
        assert s["session"] != first and s["lastChunk"]["prompt"] == OWL  # a new stream, with the prompt in force
        assert s["state"] == "live" and page.text_content("#go") == "Switch"
        first = s["session"]
    assert not stats(page)["errors"]
    browser.close()


def test_examples_vocabulary_and_phone_layout(playwright, demo_url):
    """The demo on a phone-sized screen: its examples and words, a square video scaled up crisply within the
    screen's width, the stats overlay hidden until asked for, timeline entries that switch back, Stop, and the
    recording kept DEMO_KEEP_SECONDS, then refused with a message."""
    guide = prompt_guide("demo")
    browser = launch(playwright)
    page = browser.new_page(viewport=PHONE, accept_downloads=True)
    page.goto(f"{demo_url}?transport=auto")
    expect(page.locator("#model")).to_have_text("demo")
    expect(page.locator("#prompt")).to_have_value(guide["default_prompt"])
    expect(page.locator("#examples button")).to_have_text(list(DEMO_EXAMPLES))
    expect(page.locator("#vocab")).to_be_visible()
    assert page.locator("#words button").all_text_contents() == guide["vocabulary"]
    page.fill("#prompt", "a red fox on a blue background")
    expect(page.locator("#prompt-hint")).to_have_text(re.compile(r"fox \("))  # the one word it does not know
    page.click("#vocab summary")
    page.click("#words button:text-is('circle')")
    assert page.input_value("#prompt") == "a red fox on a blue background circle"

    page.locator("#examples button").nth(1).click()  # starts the stream with it
    page.wait_for_function("window.longsana.framesShown >= 16", timeout=30_000)
    assert stats(page)["lastChunk"]["prompt"] == DEMO_EXAMPLES[1] and page.input_value("#prompt") == DEMO_EXAMPLES[1]
    assert page.is_hidden("#prompt-hint")
    box = page.locator("#screen").bounding_box()
    assert abs(box["width"] - box["height"]) <= 2 and box["width"] <= PHONE["width"], box  # 64x64: square
    assert "crisp" in page.get_attribute("#screen", "class")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # nothing sticks out sideways
    for selector in ("#prompt", "#go", "#stop", "#download"):
        box = page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (selector, box)
    assert page.is_hidden("#overlay")  # on a phone it would cover the video
    page.click("#stats-toggle")
    expect(page.locator("#overlay")).to_be_visible()

    page.locator("#examples button").nth(2).click()  # a switch, then back from the timeline
    page.wait_for_function(f"window.longsana.lastChunk.prompt === {json.dumps(DEMO_EXAMPLES[2])}", timeout=30_000)
    page.locator("#prompts li").first.click()
    page.wait_for_function(f"window.longsana.lastChunk.prompt === {json.dumps(DEMO_EXAMPLES[1])}", timeout=30_000)
    texts = [li.split("\n")[-1] for li in page.locator("#prompts li").all_inner_texts()]
    assert texts == [DEMO_EXAMPLES[1], DEMO_EXAMPLES[2], DEMO_EXAMPLES[1]]
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=ARTIFACTS / "page-phone.png", full_page=True)

    page.click("#stop")
    page.wait_for_function("window.longsana.state === 'ended'", timeout=10_000)
    ended = time.monotonic()
    expect(page.locator("#download-note")).to_have_text(f"Kept for {DEMO_KEEP_SECONDS} s")
    assert page.get_attribute("#download", "aria-disabled") == "false"
    expect(page.locator("#download")).to_have_attribute("aria-disabled", "true", timeout=10_000)
    assert time.monotonic() - ended >= DEMO_KEEP_SECONDS - 0.5
    expect(page.locator("#download-note")).to_contain_text("Deleted")
    page.wait_for_timeout(1000)  # the server's clock starts once the stream is freed, a little after the page's
    gone = page.evaluate("fetch(document.getElementById('download').href).then(async r => [r.status, await r.json()])")
    assert gone[0] == 404 and f"for {DEMO_KEEP_SECONDS} s after it ends" in gone[1]["message"]
    browser.close()
