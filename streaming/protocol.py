"""The control protocol shared by the WebRTC data channel and the WebSocket: JSON objects with a `type`.

Client -> server (each may carry an integer `seq`; the reply echoes it):
    start   {prompt, seed?, replace?}   WebSocket only, first message (WebRTC sends these fields with the offer);
                                        replace: the token of this client's earlier stream, which it ends
    prompt  {prompt, transition?}       switch the prompt from the frame on screen; transition: seconds over which
                                        the video moves from the old prompt to the new (0, the default: a cut)
    pause / resume
    stop                                end the stream now; the reply comes before the `end` event, and the
                                        recording stays downloadable (see ServerConfig.recording_keep_seconds)
    rewind  {seconds}                   go back `seconds` of what is on screen; the reply says how far it went
    stats                               the reply is a `stats` message
    ping                                keeps the stream alive (any message does; see ServerConfig.client_timeout)
Server -> client:
    hello {session, token, transport, codec, model, fps, max_prompt_chars, max_message_bytes,
        recording_keep_seconds, examples, vocabulary, default_prompt}: the page takes its limits, the video's frame
        rate and what it offers the user (streaming/guide.py) from it; the token, a secret, lets only this client
        replace the stream; ack {seq, ...}, error {seq, code, message}, stats {...},
    chunk {index, start_frame, frames, prompt, prompt_seq, gen_seconds, gen_frames, pts} when a chunk's first
        frame is sent (a chunk may come in pieces, e.g. a GPU stream's first frame alone: the chunk's generation
        time, gen_seconds for gen_frames frames, is on its last piece, 0 on the others),
    end {reason}
WebSocket video: binary messages, FRAME_HEADER then one JPEG image.

`parse_message` is the one check every client message goes through (the offer's body too), and it raises nothing
but ProtocolError: a message is a flat JSON object (no nesting; any deeper JSON is refused), at most
MAX_MESSAGE_BYTES, with finite numbers in range and strings that are valid Unicode text; each type's fields are
checked here, so the handlers get values they can use.
"""

from __future__ import annotations

import json
import math
import struct

from longsana.config import MAX_PROMPT_CHARS, check_text

MAX_MESSAGE_BYTES = 16 * 1024
MAX_OFFER_BYTES = 64 * 1024  # an SDP offer is a few KB
MAX_REWIND_SECONDS = 3600.0
MAX_TRANSITION_SECONDS = 10.0  # a longer blend reads as no switch at all
SEED_RANGE = 2**32
# the fields of each client message type beyond `type` and `seq`: name -> (kind, required)
FIELDS = {
    "start": {"prompt": ("prompt", True), "seed": ("seed", False), "replace": ("text", False)},
    "offer": {"sdp": ("text", True), "prompt": ("prompt", True), "seed": ("seed", False), "replace": ("text", False)},
    "prompt": {"prompt": ("prompt", True), "transition": ("transition", False)},
    "pause": {}, "resume": {}, "stop": {}, "stats": {}, "ping": {},
    "rewind": {"seconds": ("seconds", True)},
}
CLIENT_TYPES = tuple(t for t in FIELDS if t != "offer")  # the offer is the body of POST /offer, not a message
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


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError(f"{text[:20]} is out of range")
    return value


def parse_message(raw: str | bytes) -> dict:
    """Decode and check one client message: its type's fields (see FIELDS), typed and in range; other fields are
    ignored. Raises only ProtocolError, whatever `raw` holds."""
    msg, seq = _decode(raw, MAX_MESSAGE_BYTES)
    kind = msg.get("type")
    if kind not in CLIENT_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {_show(kind)}; known: {', '.join(CLIENT_TYPES)}",
                            seq)
    return _fields(msg, kind, seq)


def parse_offer(raw: bytes) -> dict:
    """The body of POST /offer, checked as parse_message checks a message."""
    msg, seq = _decode(raw, MAX_OFFER_BYTES)
    if msg.get("type") != "offer":
        raise ProtocolError("bad_message", f'type must be "offer", got {_show(msg.get("type"))}', seq)
    return _fields(msg, "offer", seq)


def _decode(raw: str | bytes, max_bytes: int) -> tuple[dict, int | None]:
    """A flat JSON object of valid text, and its seq."""
    size = len(raw.encode(errors="surrogatepass")) if isinstance(raw, str) else len(raw)
    if size > max_bytes:
        raise ProtocolError("too_large", f"message of {size} bytes; the limit is {max_bytes}")
    try:
        msg = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ProtocolError("bad_json", "not valid JSON: nested too deep") from None
    except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError included
        raise ProtocolError("bad_json", f"not valid JSON: {str(e)[:200]}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_message", f"expected a JSON object, got {type(msg).__name__}")
    seq = msg.get("seq")
    if seq is not None and (type(seq) is not int or not 0 <= seq < 2**53):
        raise ProtocolError("bad_message", f"seq must be a non-negative integer, got {_show(seq)}")
    for name, value in msg.items():
        if isinstance(value, (dict, list)):
            raise ProtocolError("bad_message", f"field {_show(name)} must not be nested", seq)
        if not _is_text(name) or isinstance(value, str) and not _is_text(value):
            raise ProtocolError("bad_prompt" if name == "prompt" else "bad_message",
                                f"field {_show(name)} is not valid Unicode text", seq)
    return msg, seq


def _fields(msg: dict, kind: str, seq: int | None) -> dict:
    checked = {"type": kind, "seq": seq}
    for name, (check, required) in FIELDS[kind].items():
        if name in msg:
            checked[name] = CHECKS[check](msg[name], kind, name, seq)
        elif required:
            raise ProtocolError("bad_message", f"{kind}: field {name!r} is missing", seq)
    return checked


def _is_text(s: str) -> bool:
    """False for a string holding a lone surrogate (valid JSON, "\\ud800", but no Unicode text)."""
    try:
        check_text(s, "")
    except ValueError:
        return False
    return True


def _show(value) -> str:
    return repr(value)[:60]


def _typed(value, kinds: tuple[type, ...], kind: str, name: str, seq):
    if not isinstance(value, kinds) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in kinds)
        raise ProtocolError("bad_message", f"{kind}: field {name!r} must be a {names}, got {_show(value)}", seq)
    return value


def _text(value, kind, name, seq) -> str:
    return _typed(value, (str,), kind, name, seq)


def _prompt(value, kind, name, seq) -> str:
    try:
        return check_prompt(_typed(value, (str,), kind, name, seq))
    except ValueError as e:
        raise ProtocolError("bad_prompt", str(e), seq) from None


def _seed(value, kind, name, seq) -> int:
    if not 0 <= _typed(value, (int,), kind, name, seq) < SEED_RANGE:
        raise ProtocolError("bad_message", f"{kind}: seed must be in [0, 2**32), got {_show(value)}", seq)
    return value


def _seconds(value, kind, name, seq) -> float:
    # compared before any conversion: a 400-digit integer is out of range, not a float overflow
    if not 0 < _typed(value, (int, float), kind, name, seq) <= MAX_REWIND_SECONDS:
        raise ProtocolError("bad_message", f"{kind}: seconds must be in (0, {MAX_REWIND_SECONDS:g}], got "
                                           f"{_show(value)}", seq)
    return float(value)


def _transition(value, kind, name, seq) -> float:
    if not 0 <= _typed(value, (int, float), kind, name, seq) <= MAX_TRANSITION_SECONDS:
        raise ProtocolError("bad_message", f"{kind}: transition must be in [0, {MAX_TRANSITION_SECONDS:g}] seconds, "
                                           f"got {_show(value)}", seq)
    return float(value)


CHECKS = {"text": _text, "prompt": _prompt, "seed": _seed, "seconds": _seconds, "transition": _transition}


def check_prompt(prompt: object) -> str:
    """A usable prompt or ValueError (the generator may refuse more; its ValueError is reported the same way)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt must be a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    return check_text(prompt, "the prompt")
