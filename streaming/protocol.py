"""The control protocol shared by the WebRTC data channel and the WebSocket: JSON objects with a `type`.

Client -> server (each may carry an integer `seq`; the reply echoes it):
    start   {prompt, seed?, replace?}   WebSocket only, first message (WebRTC sends these fields with the offer)
    prompt  {prompt}                    switch the prompt; applies at the next chunk the generator starts
    pause / resume
    rewind  {seconds}                   go back `seconds` of what is on screen; the reply says how far it went
    stats                               the reply is a `stats` message
    ping                                keeps the stream alive (any message does; see ServerConfig.client_timeout)
Server -> client:
    hello {session, transport, codec, model, fps, max_prompt_chars, max_message_bytes}: the page takes its limits
        and the video's frame rate from it; ack {seq, ...}, error {seq, code, message}, stats {...},
    chunk {index, start_frame, frames, prompt, prompt_seq, gen_seconds, pts} when a chunk's first frame is sent
        (a GPU stream sends its first chunk in two pieces: its first frame, gen_seconds 0, then the rest),
    end {reason}
WebSocket video: binary messages, FRAME_HEADER then one JPEG image.
"""

from __future__ import annotations

import json
import struct

from longsana.config import MAX_PROMPT_CHARS

MAX_MESSAGE_BYTES = 16 * 1024
MAX_REWIND_SECONDS = 3600.0
CLIENT_TYPES = ("start", "prompt", "pause", "resume", "rewind", "stats", "ping")
# prompt_seq, chunk index, video frame index, pts (90 kHz); little-endian, 20 bytes
FRAME_HEADER = struct.Struct("<IIId")


class ProtocolError(Exception):
    """A message the server refuses; `reply()` is the error message sent back."""

    def __init__(self, code: str, message: str, seq: int | None = None):
        super().__init__(message)
        self.code, self.message, self.seq = code, message, seq

    def reply(self) -> dict:
        return error(self.code, self.message, self.seq)


def error(code: str, message: str, seq: int | None = None) -> dict:
    return {"type": "error", "seq": seq, "code": code, "message": message}


def parse_message(raw: str | bytes) -> dict:
    """Decode and check one client message (types and field types; values are checked by their handlers)."""
    size = len(raw.encode()) if isinstance(raw, str) else len(raw)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message of {size} bytes; the limit is {MAX_MESSAGE_BYTES}")
    try:
        msg = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError("bad_json", f"not valid JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_message", f"expected a JSON object, got {type(msg).__name__}")
    seq = msg.get("seq")
    if seq is not None and (type(seq) is not int or seq < 0):
        raise ProtocolError("bad_message", f"seq must be a non-negative integer, got {seq!r}")
    kind = msg.get("type")
    if kind not in CLIENT_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}; known: {', '.join(CLIENT_TYPES)}", seq)
    return msg


def field(msg: dict, name: str, kind: type | tuple[type, ...], default=...):
    """msg[name] checked against `kind` (bools are not numbers here); a ProtocolError names the field."""
    if name not in msg and default is not ...:
        return default
    value, kinds = msg.get(name), kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ProtocolError("bad_message", f"{msg.get('type')}: field {name!r} must be a {names}, got {value!r}",
                            msg.get("seq"))
    return value


def check_prompt(prompt: object) -> str:
    """A usable prompt or ValueError (the generator may refuse more; its ValueError is reported the same way)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt must be a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    return prompt


def rewind_seconds(msg: dict) -> float:
    seconds = float(field(msg, "seconds", (int, float)))
    if not 0 < seconds <= MAX_REWIND_SECONDS:
        raise ProtocolError("bad_message", f"rewind: seconds must be in (0, {MAX_REWIND_SECONDS:g}], got {seconds}",
                            msg.get("seq"))
    return seconds
