"""The streaming server and its parts. `longsana serve` (server.py) streams a generator to browsers over WebRTC
(webrtc.py) or the WebSocket fallback (httpd.py), one session per viewer (session.py: a generator thread, an
encoder thread, a pacer), encoding each frame once (media.py). protocol.py is the control protocol, metrics.py the
/metrics text, client.py a Python client, synthetic.py a test source with the generator's interface."""
