"""WebRTC through aiortc: answer a browser's offer with a video track fed by a Session, and carry the control
messages on the data channel the page opens.

The track hands aiortc the session's H.264 packets when the browser offers H.264 (aiortc sends pre-encoded
packets as they are); otherwise it hands the raw frames and aiortc encodes them (VP8). aiortc sends each frame as
soon as `recv()` returns it and stamps it with the frame's pts, so the session's pacer sets both the timing and
the timeline.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Callable

import aioice.ice
from aiortc import (MediaStreamTrack, RTCConfiguration, RTCDataChannel, RTCIceServer, RTCPeerConnection,
                    RTCRtpSender, RTCSessionDescription)
from aiortc.codecs import vpx
from aiortc.mediastreams import MediaStreamError

from longsana.streaming.session import Session, StreamEnded

EVENT_BACKLOG = 64  # events kept while the data channel is not open yet
# aiortc's VP8 encoder starts at 500 kbps and climbs slowly, rebuilding itself (and sending a keyframe) at each
# step: starting at the ceiling gives full quality at once and no rebuilds.
vpx.DEFAULT_BITRATE = vpx.MAX_BITRATE = 2_500_000


def use_loopback_candidates() -> None:
    """Make 127.0.0.1 the only ICE host candidate, for machines whose only interface is loopback (CI).

    aioice leaves loopback out of its candidates, so no connection could form there; browsers also need
    --allow-loopback-in-peer-connection. This changes every peer connection in the process."""
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


class SessionTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, on_sent: Callable[[int | None], None]):
        super().__init__()
        self.on_sent = on_sent  # on_sent(encoded bytes, None when aiortc encodes)
        self.session: Session | None = None  # set once the offer is answered: recv is called only after that
        self.passthrough = True  # H.264 packets as they are; False: raw frames for aiortc to encode

    async def recv(self):
        try:
            frame = await self.session.next_frame()
        except StreamEnded:
            self.stop()
            raise MediaStreamError from None
        if self.passthrough:
            self.on_sent(frame.packet.size)
            return frame.packet
        self.on_sent(None)
        return frame.image


class RtcPeer:
    """One browser over WebRTC: its peer connection and its data channel."""

    transport = "webrtc"

    def __init__(self, ice_servers: list[str]):
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(url) for url in ice_servers]))
        self.channel: RTCDataChannel | None = None
        self._backlog: deque[str] = deque(maxlen=EVENT_BACKLOG)

    async def answer(self, sdp: str, track: SessionTrack) -> str:
        """The answer to the offer `sdp`, sending `track` on the offer's video transceiver (H.264 if offered)."""
        # the transceiver exists before the offer is applied: aiortc picks the codecs while applying it
        transceiver = self.pc.addTransceiver(track, direction="sendonly")
        track.passthrough = "h264/90000" in sdp.lower()
        if track.passthrough:
            transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                             if c.mimeType.lower() in ("video/h264", "video/rtx")])
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        if transceiver.mid is None:
            raise ValueError("the offer has no video section (add a recvonly video transceiver)")
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp

    def attach(self, channel: RTCDataChannel) -> None:
        self.channel = channel
        while self._backlog:
            channel.send(self._backlog.popleft())

    def send(self, message: dict) -> None:
        text = json.dumps(message)
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(text)
        elif self.channel is None:  # events from before the channel opened (the first chunk, hello)
            self._backlog.append(text)

    async def close(self) -> None:
        # let queued messages (an error, "end") leave before the connection goes
        for _ in range(20):
            if self.channel is None or self.channel.readyState != "open" or not self.channel.bufferedAmount:
                break
            await asyncio.sleep(0.05)
        await self.pc.close()
