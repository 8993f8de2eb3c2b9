// LongSANA live page: connect (WebRTC, or the WebSocket fallback), play the stream, switch prompts, rewind,
// pause, stop, download what was streamed, and measure what the viewer gets. The protocol is described in
// streaming/protocol.py; what the page offers for the model in force (its default and example prompts, its words)
// comes from the server (GET /model before a stream, `hello` with each). Everything measured is also in
// `window.longsana`, which the end-to-end tests read.
"use strict";

const $ = (id) => document.getElementById(id);
const el = {
  screen: $("screen"), video: $("video"), canvas: $("canvas"), placeholder: $("placeholder"),
  overlay: $("overlay"), banner: $("banner"), status: $("status"), transport: $("transport"), model: $("model"),
  form: $("prompt-form"), prompt: $("prompt"), go: $("go"), stop: $("stop"), hint: $("prompt-hint"),
  examples: $("examples"), vocab: $("vocab"), words: $("words"), seed: $("seed"), transition: $("transition"),
  pause: $("pause"), rewind: $("rewind"), rewindSeconds: $("rewind-seconds"),
  download: $("download"), downloadNote: $("download-note"), statsToggle: $("stats-toggle"),
  fullscreen: $("fullscreen"), track: $("track"), prompts: $("prompts"),
  out: { gen: $("o-gen"), play: $("o-play"), ttff: $("o-ttff"), switch: $("o-switch"), stream: $("o-stream") },
};

const stats = (window.longsana = {
  state: "idle", transport: null, codec: null, session: null, fps: null, width: null, height: null,
  framesShown: 0, ttffMs: null, switchMs: null, switchEstimated: false, genFps: null, playFps: null,
  promptSeq: -1, lastChunk: null, acks: 0, errors: [], fallbackMs: null,
});

const ACK_TIMEOUT_MS = 5000;
const WEBRTC_CONNECT_MS = 3000; // no WebRTC connection this long after the answer: fall back to the WebSocket
const ICE_GATHER_MS = 1000; // host candidates are gathered at once; waiting longer only delays the offer
const SWITCH_MATCH_MS = 40; // a frame received this close to its chunk event is that chunk's first frame
const CRISP_SCALE = 2; // shown at least this many times its size, the video is scaled up pixel by pixel
const PHONE = window.matchMedia("(max-width: 560px)");
const STATS_KEY = "longsana.stats"; // the viewer's choice to show the stats overlay, kept across visits
let conn = null; // {kind, send(message), close()}: the stream, or the connection being made
let token = null; // the secret of our latest stream: a new one replaces it (the server frees its slot first)
let inForce = null; // the prompt in force: a transport switch starts the new stream with it
let keepSeconds = 0; // how long the server keeps a recording after its stream ends
let vocabulary = null; // the model's words (a Set), where it knows only a few
let seq = 0;
const waiting = new Map(); // seq -> resolve(reply)
let startedAt = 0;
let switching = null; // {prompt, at, fromSeq, promptSeq?, recvAt?}: a prompt change not on screen yet
let playoutDelayMs = 0; // WebRTC jitter buffer delay, for browsers that do not report frame receive times
let paused = false;
let showStats = localStorage.getItem(STATS_KEY) !== null ? localStorage.getItem(STATS_KEY) === "1" : !PHONE.matches;
const segments = [];
const shown = []; // [time, framesShown] over the last 2 s, for the playback rate
let timers = [];
let downloadTimer = 0;

// -- connection ------------------------------------------------------------------------------------------------
async function start(prompt, mode = el.transport.value) {
  const seed = readSeed();
  if (seed === undefined) return;
  let replace = token;
  reset();
  startedAt = performance.now();
  inForce = prompt;
  setState("connecting");
  const fields = { prompt, ...(seed === null ? {} : { seed }) };
  if (mode !== "websocket") {
    try {
      await connectWebRTC(fields, replace);
      return;
    } catch (e) {
      if (e.aborted) return;
      if (e.code || mode === "webrtc") return fail(e);
      replace = e.token || replace; // the server already holds a stream for us: end it (its token proves it is ours)
      stats.fallbackMs = performance.now() - startedAt;
      showBanner(`WebRTC did not connect (${e.message}); using the WebSocket fallback`);
    }
  }
  try {
    await connectWebSocket(fields, replace);
  } catch (e) {
    if (!e.aborted) fail(e);
  }
}

function readSeed() {
  const text = el.seed.value.trim();
  if (!text) return null;
  const seed = Number(text);
  if (Number.isInteger(seed) && seed >= 0 && seed < 2 ** 32) return seed;
  showBanner("The seed must be a whole number from 0 to 4294967295, or empty for a random one", "error");
  return undefined;
}

const aborted = () => Object.assign(new Error("stopped"), { aborted: true });

async function connectWebRTC(fields, replace) {
  const pc = new RTCPeerConnection({ iceServers: [] });
  const channel = pc.createDataChannel("control"); // before the offer, so that the offer carries it
  pc.addTransceiver("video", { direction: "recvonly" });
  const c = {
    kind: "webrtc", pc,
    send: (m) => channel.readyState === "open" && (channel.send(JSON.stringify(m)), true),
    close: () => pc.close(),
  };
  conn = c;
  channel.onmessage = (e) => conn === c && onMessage(JSON.parse(e.data));
  pc.ontrack = (e) => {
    if (conn !== c) return;
    el.video.srcObject = new MediaStream([e.track]);
    el.video.hidden = false;
    el.video.play().catch(() => {});
    watchVideo();
  };
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc, ICE_GATHER_MS);
  const res = await fetch("/offer", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp, ...fields, ...(replace ? { replace } : {}) }),
  });
  const body = await res.json();
  if (conn !== c || !res.ok) {
    pc.close();
    if (res.ok) token = body.token;
    throw conn !== c ? aborted() : serverError(body);
  }
  token = body.token;
  stats.session = body.session;
  await pc.setRemoteDescription({ type: "answer", sdp: body.sdp });
  try {
    await connected(pc, WEBRTC_CONNECT_MS);
  } catch (e) {
    pc.close();
    e.token = body.token;
    throw conn !== c ? aborted() : e;
  }
  pc.onconnectionstatechange = () => {
    if (["failed", "closed"].includes(pc.connectionState)) ended(c, `connection ${pc.connectionState}`);
  };
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
      if (["failed", "closed"].includes(pc.connectionState)) { clearTimeout(t); reject(new Error("ICE failed")); }
    };
    pc.addEventListener("connectionstatechange", check);
    check();
  });
}

function connectWebSocket(fields, replace) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
    ws.binaryType = "arraybuffer";
    const c = {
      kind: "websocket", ws,
      send: (m) => ws.readyState === 1 && (ws.send(JSON.stringify(m)), true),
      close: () => ws.close(),
    };
    conn = c;
    let started = false;
    ws.onopen = () => ws.send(JSON.stringify({ type: "start", seq: 0, ...fields, ...(replace ? { replace } : {}) }));
    ws.onmessage = (e) => {
      if (conn !== c) return;
      if (typeof e.data !== "string") return drawJpeg(e.data);
      const m = JSON.parse(e.data);
      if (!started && m.type === "error") return reject(serverError(m));
      if (!started && m.type === "hello") { started = true; resolve(); }
      onMessage(m);
    };
    ws.onerror = () => { if (!started) reject(conn === c ? new Error("the WebSocket did not connect") : aborted()); };
    ws.onclose = (e) => {
      if (started) ended(c, e.reason || "connection closed");
      else reject(aborted());
    };
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
      token = m.token;
      el.prompt.maxLength = m.max_prompt_chars; // the server's limit, known once connected
      useGuide(m);
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
      if (m.gen_fps) stats.genFps = m.gen_fps;
      break;
    case "chunk":
      onChunk(m);
      break;
    case "end":
      ended(conn, m.reason);
      break;
  }
}

function onChunk(m) {
  stats.lastChunk = m;
  if (m.gen_seconds > 0) stats.genFps = m.gen_frames / m.gen_seconds; // 0: a chunk's piece; its time is on the last
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

// -- what the model offers: its name, default and example prompts, its words -------------------------------------
function useGuide(g) {
  el.model.textContent = g.model;
  keepSeconds = g.recording_keep_seconds;
  el.examples.replaceChildren(...g.examples.map((text) => {
    const b = Object.assign(document.createElement("button"), { type: "button", className: "example", textContent: text });
    b.addEventListener("click", () => use(text));
    return b;
  }));
  vocabulary = g.vocabulary ? new Set(g.vocabulary) : null;
  el.vocab.hidden = !vocabulary;
  el.words.replaceChildren(...(g.vocabulary || []).map((w) => {
    const b = Object.assign(document.createElement("button"), { type: "button", className: "word", textContent: w });
    b.addEventListener("click", () => {
      el.prompt.value = `${el.prompt.value.trimEnd()} ${w}`.trimStart();
      checkWords();
    });
    return b;
  }));
  el.vocab.querySelector("summary").textContent = `Words this model knows (${(g.vocabulary || []).length})`;
  checkWords();
}

function checkWords() {
  const unknown = vocabulary ? (el.prompt.value.toLowerCase().match(/[a-z]+|\d+/g) || []).filter((w) => !vocabulary.has(w)) : [];
  el.hint.hidden = !unknown.length;
  el.hint.textContent = `Not words this model knows: ${[...new Set(unknown)].join(", ")} (see the list below)`;
}

function use(prompt) { // an example or a timeline entry: into the box, and on screen
  el.prompt.value = prompt;
  checkWords();
  submit();
}

async function loadGuide() {
  try {
    const g = await (await fetch("/model")).json();
    useGuide(g);
    if (!el.prompt.value) el.prompt.value = g.default_prompt;
    checkWords();
    setAspect(g.width, g.height);
  } catch (e) {
    showBanner(`Could not reach the server: ${e.message}`, "error");
  }
}

// -- frames ------------------------------------------------------------------------------------------------------
function watchVideo() {
  const v = el.video;
  v.onresize = () => setAspect(v.videoWidth, v.videoHeight);
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
      setAspect(image.width, image.height);
    }
    el.canvas.hidden = false;
    ctx.drawImage(image, 0, 0);
    image.close();
    presented({ promptSeq }, stats.framesShown + 1);
  }).catch(() => {});
}

// The screen takes the video's shape; a small video (the demo's 64x64) is scaled up pixel by pixel, not blurred.
function setAspect(width, height) {
  if (!width || !height) return;
  Object.assign(stats, { width, height });
  el.screen.style.setProperty("--ar", width / height);
  el.screen.classList.toggle("crisp", CRISP_SCALE * width <= el.screen.clientWidth);
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
    setDownload(true, "");
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
const minutes = (s) => (s >= 120 ? `${Math.round(s / 60)} min` : `${Math.round(s)} s`);

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
    Object.assign(seg.item, { tabIndex: 0, title: "Use this prompt again" });
    seg.item.setAttribute("role", "button");
    seg.item.addEventListener("click", () => use(m.prompt));
    seg.item.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); use(m.prompt); } });
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
  if (stats.state === "connecting") return start(prompt); // not started yet: start over with this prompt
  switching = { prompt, at: performance.now(), fromSeq: stats.promptSeq };
  const reply = await send("prompt", { prompt, transition: Number(el.transition.value) });
  if (reply.type === "error") {
    switching = null;
    showBanner(reply.message, "error");
  } else {
    inForce = prompt;
  }
}

async function stop() {
  const c = conn;
  if (!c) return;
  if (stats.state === "connecting") { // nothing on screen yet: drop the connection being made
    conn = null;
    c.close();
    setState("idle");
    return showBanner("Stopped before the first frame.");
  }
  const reply = await send("stop"); // the server answers, then sends `end`, then closes the connection
  if (reply.type !== "ack") ended(c, "stopped"); // no answer: the connection is gone, or going
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

function switchTransport() {
  if (stats.state === "live" || stats.state === "paused") start(inForce); // a new stream on it, the old one replaced
}

function setState(state) {
  stats.state = state;
  el.status.dataset.state = el.screen.dataset.state = state;
  el.status.textContent = state;
  const live = state === "live" || state === "paused";
  el.pause.disabled = el.rewind.disabled = !live;
  el.stop.disabled = !(live || state === "connecting");
  el.go.textContent = live || state === "connecting" ? "Switch" : "Start";
  renderStatsToggle();
}

function renderStatsToggle() {
  const state = stats.state;
  el.overlay.hidden = !showStats || !(state === "live" || state === "paused" || state === "ended");
  el.statsToggle.setAttribute("aria-pressed", String(showStats));
}

function toggleStats() {
  showStats = !showStats;
  localStorage.setItem(STATS_KEY, showStats ? "1" : "0");
  renderStatsToggle();
}

function toggleFullscreen() {
  if (document.fullscreenElement) document.exitFullscreen();
  else el.screen.requestFullscreen().catch((e) => showBanner(`No fullscreen: ${e.message}`, "error"));
}

// The recording stays downloadable for keepSeconds after the stream ends (the server deletes it then).
function setDownload(enabled, note) {
  el.download.setAttribute("aria-disabled", String(!enabled));
  el.downloadNote.textContent = note;
}

function keepRecording() {
  if (el.download.getAttribute("aria-disabled") === "true") return; // nothing was shown
  if (!keepSeconds) return setDownload(false, "Recordings are not kept after their stream ends");
  setDownload(true, `Kept for ${minutes(keepSeconds)}`);
  downloadTimer = setTimeout(() => setDownload(false, `Deleted: recordings are kept ${minutes(keepSeconds)} after ` +
                                                     "their stream ends"), keepSeconds * 1000);
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

function ended(c, reason) {
  if (!c || conn !== c) return;
  conn = null;
  c.close();
  timers.forEach(clearInterval);
  timers = [];
  setState("ended");
  keepRecording();
  showBanner(`Stream ended: ${reason}. Press Enter to start a new one.`);
}

function reset() {
  const c = conn;
  conn = null; // first: the old connection's events are ignored from now on
  if (c) c.close();
  timers.forEach(clearInterval);
  timers = [];
  clearTimeout(downloadTimer);
  Object.assign(stats, {
    framesShown: 0, ttffMs: null, switchMs: null, playFps: null, genFps: null, promptSeq: -1, transport: null,
    lastChunk: null, fallbackMs: null,
  });
  switching = null;
  paused = false;
  el.pause.textContent = "Pause";
  shown.length = 0;
  segments.length = 0;
  el.track.replaceChildren();
  el.prompts.replaceChildren();
  el.video.hidden = el.canvas.hidden = true;
  el.video.srcObject = null;
  el.placeholder.hidden = false;
  setDownload(false, "");
}

el.form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
el.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
});
el.prompt.addEventListener("input", checkWords);
el.stop.addEventListener("click", stop);
el.pause.addEventListener("click", togglePause);
el.rewind.addEventListener("click", rewind);
el.transport.addEventListener("change", switchTransport);
el.statsToggle.addEventListener("click", toggleStats);
el.fullscreen.addEventListener("click", toggleFullscreen);
el.fullscreen.hidden = !document.fullscreenEnabled;
window.addEventListener("resize", () => setAspect(stats.width, stats.height));
window.addEventListener("pagehide", () => conn && conn.close());
const wanted = new URLSearchParams(location.search).get("transport");
if (["auto", "webrtc", "websocket"].includes(wanted)) el.transport.value = wanted;
setState("idle");
loadGuide();
setInterval(renderOverlay, 250);
