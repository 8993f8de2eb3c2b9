"""The demo as a user meets it: `python -m longsana.benchmarks.page` (CPU; needs Debian's chromium and playwright,
the test extra).

Starts `longsana serve` fresh (the built-in demo model, default settings, through the `longsana` command so that
its CPU thread policy applies), opens the page in headless Chromium on this machine and starts a stream over
WebRTC, as a viewer would: the browser decoding and playing the video is a busy process beside the generator. With
--busy N, N more processes spin a core each. It reports what the page itself measures (window.longsana): the time
from pressing Enter to the first frame on screen for the fresh server's first stream, then, over --seconds of
playback, the generation rate (frames per second of generating, from the chunks' own times) and the playback rate
(frames presented per second), sampled every second; medians, and one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required",
         "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns"]
BUSY = "while True: pass"


def serve() -> tuple[subprocess.Popen, str]:
    """A fresh `longsana serve` (demo model) on a free port, and its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "longsana", "serve", "--port", "0", "--ice-loopback"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://\S+", line)
    if not match:
        proc.terminate()
        raise RuntimeError(f"the server printed {line!r}")
    return proc, match.group(0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=15.0, help="seconds of playback to sample")
    p.add_argument("--busy", type=int, default=0, help="processes spinning a core each beside it")
    p.add_argument("--transport", default="webrtc", choices=["webrtc", "websocket"])
    a = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(a.busy)]
    proc, url = serve()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page()
            page.goto(f"{url}?transport={a.transport}")
            page.wait_for_function("document.querySelector('#prompt').value.length > 0")  # the model's default
            page.press("#prompt", "Enter")
            page.wait_for_function("window.longsana.ttffMs !== null", timeout=60_000)
            ttff = page.evaluate("window.longsana.ttffMs") / 1000
            gen, play = [], []
            for _ in range(round(a.seconds)):
                time.sleep(1.0)
                s = page.evaluate("window.longsana")
                if s["genFps"]:
                    gen.append(s["genFps"])
                if s["playFps"]:
                    play.append(s["playFps"])
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
        for b in busy:
            b.kill()
    res = dict(bench="page", date=str(datetime.date.today()), cpus=os.cpu_count(), busy=a.busy,
               transport=a.transport, ttff_s=ttff, gen_fps_median=statistics.median(gen) if gen else None,
               gen_fps_min=min(gen, default=None), play_fps_median=statistics.median(play) if play else None,
               play_fps_min=min(play, default=None))
    print(f"# the demo in headless Chromium on {os.cpu_count()} CPUs, {a.busy} busy process(es), {a.transport}")
    print(f"  first frame of the fresh server's first stream: {ttff:.2f} s after Enter")
    if gen and play:
        print(f"  over {len(gen)} s: generation {res['gen_fps_median']:.1f} fps (min {res['gen_fps_min']:.1f}), "
              f"playback {res['play_fps_median']:.1f} fps (min {res['play_fps_min']:.1f})")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
