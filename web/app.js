// LongSANA live page: connect (WebRTC, or the WebSocket fallback), play the stream, switch prompts, rewind,
// pause, download what was streamed, and measure what the viewer gets. The protocol is described in
// streaming/protocol.py. Everything measured is also in `window.longsana`, which the end-to-end tests read.
"use strict";

const $ = (id) => document.getElementById(id);
const el = {
  screen: $("screen"), video: $("video"), canvas: $("canvas"), placeholder: $("placeholder"),
  overlay: $("overlay"), banner: $("banner"), status: $("status"), transport: $("transport"),
  form: $("prompt-form"), prompt: $("prompt"), go: $("go"), pause: $("pause"), rewind: $("rewind"),
  rewindSeconds: $("rewind-seconds"), download: $("download"), track: $("track"), prompts: $("prompts"),
  out: { gen: $("o-gen"), play: $("o-play"), ttff: $("o-ttff"), switch: $("o-switch"), stream: $("o-stream") },
};

const stats = (window.longsana = {
  state: "idle", transport: null, codec: null, session: null, fps: null, width: null, height: null,
  framesShown: 0, ttffMs: null, switchMs: null, switchEstimated: false, genFps: null, playFps: null,
  promptSeq: -1, lastChunk: null, acks: 0, errors: [],
});

const ACK_TIMEOUT_MS = 5000;
const SWITCH_MATCH_MS = 40; // a frame received this close to its chunk event is that chunk's first frame
let conn = null; // {kind, send(message), close()}
let seq = 0;
const waiting = new Map(); // seq -> resolve(reply)
let startedAt = 0;
let switching = null; // {prompt, at, fromSeq, promptSeq?, recvAt?}: a prompt change not on screen yet
let playoutDelayMs = 0; // WebRTC jitter buffer delay, for browsers that do not report frame receive times
let paused = false;
const segments = [];
const shown = []; // [time, framesShown] over the last 2 s, for the playback rate
let timers = [];

// -- connection ------------------------------------------------------------------------------------------------
async function start(prompt) {
  reset();
  startedAt = performance.now();
  setState("connecting");
  const mode = el.transport.value;
  let replace = null;
  if (mode !== "websocket") {
    try {
      conn = await connectWebRTC(prompt);
      return;
    } catch (e) {
      if (e.code || mode === "webrtc") return fail(e);
      replace = e.token || null; // the server already holds a stream for us: end it (its token proves it is ours)
      showBanner(`WebRTC did not connect (${e.message}); using the WebSocket fallback`);
    }
  }
  try {
    conn = await connectWebSocket(prompt, replace);
  } catch (e) {
    fail(e);
  }
}

async function connectWebRTC(prompt) {
  const pc = new RTCPeerConnection({ iceServers: [] });
  const channel = pc.createDataChannel("control"); // before the offer, so that the offer carries it
  pc.addTransceiver("video", { direction: "recvonly" });
  const c = {
    kind: "webrtc", pc,
    send: (m) => channel.readyState === "open" && (channel.send(JSON.stringify(m)), true),
    close: () => pc.close(),
  };
  channel.onmessage = (e) => onMessage(JSON.parse(e.data));
  pc.ontrack = (e) => {
    el.video.srcObject = new MediaStream([e.track]);
    el.video.hidden = false;
    el.video.play().catch(() => {});
    watchVideo();
  };
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc, 3000);
  const res = await fetch("/offer", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp, prompt }),
  });
  const body = await res.json();
  if (!res.ok) {
    pc.close();
    throw serverError(body);
  }
  stats.session = body.session;
  await pc.setRemoteDescription({ type: "answer", sdp: body.sdp });
  try {
    await connected(pc, 10000);
  } catch (e) {
    pc.close();
    e.token = body.token;
    throw e;
  }
  pc.onconnectionstatechange = () => {
    if (["failed", "closed"].includes(pc.connectionState)) ended(`connection ${pc.connectionState}`);
  };
  return c;
}

function iceGathered(pc, ms) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    const t = setTimeout(resolve, ms);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(t); resolve(); }
    });
  });
}

function connected(pc, ms) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("no connection after " + ms / 1000 + " s")), ms);
    const check = () => {
      if (pc.connectionState === "connected") { clearTimeout(t); resolve(); }
      if (pc.connectionState === "failed") { clearTimeout(t); reject(new Error("ICE failed")); }
    };
    pc.addEventListener("connectionstatechange", check);
    check();
  });
}

function connectWebSocket(prompt, replace) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
    ws.binaryType = "arraybuffer";
    const c = {
      kind: "websocket", ws,
      send: (m) => ws.readyState === 1 && (ws.send(JSON.stringify(m)), true),
      close: () => ws.close(),
    };
    let started = false;
    ws.onopen = () => ws.send(JSON.stringify({ type: "start", seq: 0, prompt, ...(replace ? { replace } : {}) }));
    ws.onmessage = (e) => {
      if (typeof e.data !== "string") return drawJpeg(e.data);
      const m = JSON.parse(e.data);
      if (!started && m.type === "error") return reject(serverError(m));
      if (!started && m.type === "hello") { started = true; resolve(c); }
      onMessage(m);
    };
    ws.onerror = () => { if (!started) reject(new Error("the WebSocket did not connect")); };
    ws.onclose = (e) => { if (started) ended(e.reason || "connection closed"); };
  });
}

function serverError(m) {
  return Object.assign(new Error(m.message || "refused"), { code: m.code || "error" });
}

// -- messages ----------------------------------------------------------------------------------------------------
function send(type, fields = {}) {
  const id = ++seq;
  return new Promise((resolve) => {
    if (!conn || !conn.send({ type, seq: id, ...fields })) return resolve({ type: "error", message: "not connected" });
    waiting.set(id, resolve);
    setTimeout(() => waiting.delete(id) && resolve({ type: "error", message: "no reply" }), ACK_TIMEOUT_MS);
  });
}

function onMessage(m) {
  const reply = waiting.get(m.seq);
  if (reply && ["ack", "error", "stats"].includes(m.type)) {
    waiting.delete(m.seq);
    reply(m);
  }
  switch (m.type) {
    case "hello":
      Object.assign(stats, { session: m.session, transport: m.transport, codec: m.codec, fps: m.fps });
      el.prompt.maxLength = m.max_prompt_chars; // the server's limit, known once connected
      el.download.href = `/recording/${m.session}.mp4`;
      el.download.download = `longsana-${new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-")}.mp4`;
      timers.push(setInterval(poll, 1000)); // also the heartbeat that keeps the stream alive
      break;
    case "ack":
      stats.acks++;
      break;
    case "error":
      stats.errors.push(m);
      showBanner(m.message, "error");
      break;
    case "stats":
      Object.assign(stats, { width: m.width, height: m.height });
      if (m.gen_fps) stats.genFps = m.gen_fps;
      break;
    case "chunk":
      onChunk(m);
      break;
    case "end":
      ended(m.reason);
      break;
  }
}

function onChunk(m) {
  stats.lastChunk = m;
  if (m.gen_seconds > 0) stats.genFps = m.frames / m.gen_seconds; // 0: an early piece; its time is on the rest
  const pending = switching && switching.promptSeq === undefined;
  if (pending && m.prompt === switching.prompt && m.prompt_seq > switching.fromSeq) {
    switching.promptSeq = m.prompt_seq;
    switching.recvAt = performance.now();
  }
  stats.promptSeq = m.prompt_seq;
  addToTimeline(m);
}

async function poll() {
  const s = await send("stats");
  if (conn && conn.kind === "webrtc") {
    const report = await conn.pc.getStats();
    report.forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video" && r.jitterBufferEmittedCount) {
        playoutDelayMs = (1000 * r.jitterBufferDelay) / r.jitterBufferEmittedCount;
      }
    });
  }
  return s;
}

// -- frames ------------------------------------------------------------------------------------------------------
function watchVideo() {
  const v = el.video;
  if ("requestVideoFrameCallback" in v) {
    const onFrame = (now, meta) => {
      presented({ receiveTime: meta.receiveTime }, meta.presentedFrames);
      v.requestVideoFrameCallback(onFrame);
    };
    v.requestVideoFrameCallback(onFrame);
  } else { // older browsers: count decoded frames
    timers.push(setInterval(() => {
      const n = v.getVideoPlaybackQuality().totalVideoFrames;
      if (n > stats.framesShown) presented({}, n);
    }, 30));
  }
}

let drawing = Promise.resolve();
const ctx = el.canvas.getContext("2d");
function drawJpeg(buffer) {
  const view = new DataView(buffer); // FRAME_HEADER: prompt_seq, chunk, frame (uint32), pts (float64)
  const promptSeq = view.getUint32(0, true);
  const blob = new Blob([new Uint8Array(buffer, 20)], { type: "image/jpeg" });
  drawing = drawing.then(() => createImageBitmap(blob)).then((image) => {
    if (el.canvas.width !== image.width || el.canvas.height !== image.height) {
      el.canvas.width = image.width;
      el.canvas.height = image.height;
    }
    el.canvas.hidden = false;
    ctx.drawImage(image, 0, 0);
    image.close();
    presented({ promptSeq }, stats.framesShown + 1);
  }).catch(() => {});
}

function presented(frame, count) {
  const now = performance.now();
  stats.framesShown = count ?? stats.framesShown + 1;
  shown.push([now, stats.framesShown]);
  while (now - shown[0][0] > 2000) shown.shift();
  if (stats.ttffMs === null) {
    stats.ttffMs = now - startedAt;
    el.placeholder.hidden = true;
    setState("live");
    el.download.setAttribute("aria-disabled", "false");
  }
  if (switching && switching.promptSeq !== undefined && isSwitchFrame(frame, now)) {
    stats.switchMs = now - switching.at;
    stats.switchEstimated = frame.promptSeq === undefined && frame.receiveTime === undefined;
    switching = null;
  }
}

// The first frame that uses the new prompt: exact on the WebSocket (frames carry prompt_seq) and where the
// browser reports when a frame arrived (it arrives with its chunk event); else the chunk event plus the
// measured jitter buffer delay.
function isSwitchFrame(frame, now) {
  if (frame.promptSeq !== undefined) return frame.promptSeq >= switching.promptSeq;
  if (frame.receiveTime !== undefined) return frame.receiveTime >= switching.recvAt - SWITCH_MATCH_MS;
  return now >= switching.recvAt + playoutDelayMs;
}

// -- overlay, timeline, controls -----------------------------------------------------------------------------------
function renderOverlay() {
  const now = performance.now();
  if (shown.length > 1 && now - shown[shown.length - 1][0] < 1000) {
    const [t0, n0] = shown[0], [t1, n1] = shown[shown.length - 1];
    stats.playFps = t1 > t0 ? ((n1 - n0) * 1000) / (t1 - t0) : null;
  } else if (stats.ttffMs !== null) {
    stats.playFps = 0;
  }
  el.out.gen.textContent = stats.genFps ? `${stats.genFps.toFixed(1)} fps` : "–";
  el.out.play.textContent = stats.playFps !== null ? `${stats.playFps.toFixed(1)} fps` : "–";
  el.out.ttff.textContent = stats.ttffMs !== null ? ms(stats.ttffMs) : "–";
  const approx = stats.switchEstimated ? "≈ " : ""; // estimated from the jitter buffer delay
  el.out.switch.textContent = stats.switchMs === null ? "–" : approx + ms(stats.switchMs);
  const name = stats.transport === "webrtc" ? "WebRTC" : "WebSocket";
  const size = stats.width ? ` · ${stats.width}×${stats.height}` : "";
  el.out.stream.textContent = stats.transport ? `${name} · ${stats.codec}${size}` : "–";
}

const ms = (x) => (x < 1000 ? `${Math.round(x)} ms` : `${(x / 1000).toFixed(2)} s`);
const clock = (s) => `${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, "0")}`;

function hue(text) {
  let h = 0;
  for (const ch of text) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return `hsl(${h % 360} 70% 62%)`;
}

function addToTimeline(m) {
  let seg = segments[segments.length - 1];
  const rewound = seg !== undefined && m.start_frame < seg.endFrame;
  if (!seg || seg.promptSeq !== m.prompt_seq || rewound) {
    seg = { prompt: m.prompt, promptSeq: m.prompt_seq, frames: 0, endFrame: m.start_frame, color: hue(m.prompt) };
    seg.bar = Object.assign(document.createElement("div"), { className: "seg", title: m.prompt });
    seg.bar.style.background = seg.color;
    el.track.append(seg.bar);
    seg.item = document.createElement("li");
    seg.item.innerHTML = '<span class="swatch"></span><span class="time"></span><span class="text"></span>';
    seg.item.querySelector(".swatch").style.background = seg.color;
    seg.item.querySelector(".time").textContent = clock(m.start_frame / stats.fps);
    seg.item.querySelector(".text").textContent = m.prompt;
    if (rewound) {
      const note = document.createElement("div");
      note.className = "note";
      note.textContent = `⟲ back to ${clock(m.start_frame / stats.fps)}`;
      seg.item.querySelector(".text").prepend(note);
    }
    el.prompts.querySelector(".empty")?.remove();
    el.prompts.querySelector(".current")?.classList.remove("current");
    seg.item.classList.add("current");
    el.prompts.append(seg.item);
    seg.item.scrollIntoView({ block: "nearest" });
    segments.push(seg);
  }
  seg.frames += m.frames;
  seg.endFrame = m.start_frame + m.frames;
  seg.bar.style.flexGrow = seg.frames;
}

async function submit() {
  const prompt = el.prompt.value.trim();
  if (!prompt) {
    el.form.classList.remove("shake");
    void el.form.offsetWidth; // restart the animation
    el.form.classList.add("shake");
    return;
  }
  if (!conn) return start(prompt);
  switching = { prompt, at: performance.now(), fromSeq: stats.promptSeq };
  const reply = await send("prompt", { prompt });
  if (reply.type === "error") {
    switching = null;
    showBanner(reply.message, "error");
  }
}

async function togglePause() {
  const reply = await send(paused ? "resume" : "pause");
  if (reply.type !== "ack") return showBanner(reply.message, "error");
  paused = !paused;
  el.pause.textContent = paused ? "Resume" : "Pause";
  setState(paused ? "paused" : "live");
}

async function rewind() {
  const reply = await send("rewind", { seconds: Number(el.rewindSeconds.value) });
  if (reply.type !== "ack") return showBanner(reply.message, "error");
  showBanner(reply.rewound > 0 ? `Rewound ${reply.rewound.toFixed(1)} s` : "Already at the start");
}

function setState(state) {
  stats.state = state;
  el.status.dataset.state = el.screen.dataset.state = state;
  el.status.textContent = state;
  const live = state === "live" || state === "paused";
  el.pause.disabled = el.rewind.disabled = !live;
  el.overlay.hidden = !(live || state === "ended");
  el.go.textContent = conn || state === "connecting" ? "Switch" : "Start";
}

let bannerTimer = 0;
function showBanner(text, kind = "info") {
  el.banner.textContent = text;
  el.banner.dataset.kind = kind;
  el.banner.hidden = false;
  clearTimeout(bannerTimer);
  bannerTimer = setTimeout(() => (el.banner.hidden = true), 6000);
}

function fail(e) {
  conn = null;
  setState(e.code === "busy" ? "busy" : "error");
  showBanner(e.message, "error");
}

function ended(reason) {
  if (!conn) return;
  const c = conn;
  conn = null;
  c.close();
  timers.forEach(clearInterval);
  timers = [];
  setState("ended");
  showBanner(`Stream ended: ${reason}. Press Enter to start a new one.`);
}

function reset() {
  if (conn) conn.close();
  conn = null;
  timers.forEach(clearInterval);
  timers = [];
  Object.assign(stats, {
    framesShown: 0, ttffMs: null, switchMs: null, playFps: null, genFps: null, promptSeq: -1, transport: null,
  });
  switching = null;
  paused = false;
  el.pause.textContent = "Pause";
  shown.length = 0;
  el.video.hidden = el.canvas.hidden = true;
  el.video.srcObject = null;
  el.placeholder.hidden = false;
  el.download.setAttribute("aria-disabled", "true");
}

el.form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
el.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
});
el.pause.addEventListener("click", togglePause);
el.rewind.addEventListener("click", rewind);
window.addEventListener("pagehide", () => conn && conn.close());
const wanted = new URLSearchParams(location.search).get("transport");
if (["auto", "webrtc", "websocket"].includes(wanted)) el.transport.value = wanted;
setInterval(renderOverlay, 250);
