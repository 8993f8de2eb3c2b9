"""Procedural clips: captioned videos of colored shapes, for training the built-in demo model and testing it.

A `Scene` is what a caption says (shape, color, count, motion, background, stripes, camera pan); a small grammar
turns one into the other both ways (`caption`, `parse_caption`). `render` draws a scene as uint8 video; the
things a caption does not say (positions, sizes, exact speeds, orientation) come from `seed`, so one caption
has many clips. Every quantity is a closed-form function of the absolute frame index, so a clip rendered in
chunks (`start_frame`) equals the clip rendered whole, and `render_timeline` switches prompts mid-video with
the objects continuing from where they were. `measure` / `matches` read a video back (colors, object blobs and
their tracks, count, background scroll) to check that a generated video follows its caption; they are built to
survive blur and noise.

Units: positions and speeds are in "short sides" (S = min(height, width) pixels), speeds per frame at the demo's
16 fps. The camera tracks the objects: a pan scrolls only the background (pans left -> the background moves
right), so an object's motion on screen is the one its caption names.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (250, 215, 35), "green": (40, 165, 65),
    "cyan": (35, 195, 215), "blue": (30, 90, 225), "purple": (150, 40, 160), "pink": (245, 125, 190),
    "white": (240, 240, 240), "gray": (125, 125, 125), "black": (20, 20, 25),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "star")
COUNTS = (1, 2, 3)
MOTIONS = ("still", "left", "right", "up", "down", "bouncing", "spinning", "pulsing")
PATTERNS = ("plain", "striped")
PANS = ("none", "left", "right")
MIN_CONTRAST = 50.0  # CIELAB distance between object and background colors that sample_scene accepts

MOTION_PHRASES = {"still": "standing still", "left": "moving left", "right": "moving right", "up": "moving up",
                  "down": "moving down", "bouncing": "bouncing", "spinning": "spinning", "pulsing": "pulsing"}
COUNT_WORDS = {2: "two", 3: "three"}


@dataclass(frozen=True)
class Scene:
    """Everything a caption says. The defaults are what `parse_caption` fills in for missing parts
    (except that it picks a default color / background that contrasts with the one given)."""

    shape: str = "circle"
    color: str = "white"
    count: int = 1
    motion: str = "still"
    background: str = "black"
    pattern: str = "plain"
    pan: str = "none"

    def __post_init__(self):
        allowed = {"shape": SHAPES, "color": COLORS, "count": COUNTS, "motion": MOTIONS, "background": COLORS,
                   "pattern": PATTERNS, "pan": PANS}
        for f in fields(self):
            if getattr(self, f.name) not in allowed[f.name]:
                raise ValueError(f"Scene.{f.name}={getattr(self, f.name)!r}: expected one of {allowed[f.name]}")


def contrast(a: str, b: str) -> float:
    """CIELAB distance between two palette colors."""
    return float(np.linalg.norm(PALETTE_LAB[COLORS.index(a)] - PALETTE_LAB[COLORS.index(b)]))


def sample_scene(rng: np.random.Generator) -> Scene:
    """A uniformly random scene whose object color stands out from its background (`MIN_CONTRAST`).
    A spinning circle looks still, so circles never spin here."""
    while True:
        color, background = rng.choice(COLORS, 2, replace=False)
        if contrast(color, background) >= MIN_CONTRAST:
            break
    shape = str(rng.choice(SHAPES))
    motions = [m for m in MOTIONS if not (shape == "circle" and m == "spinning")]
    return Scene(shape=shape, color=str(color), count=int(rng.choice(COUNTS)), motion=str(rng.choice(motions)),
                 background=str(background), pattern=str(rng.choice(PATTERNS)), pan=str(rng.choice(PANS)))


# ---------------------------------------------------------------------------------------------------------------
# Grammar: "{a|two|three} {color} {shape}[s] {motion} on a [striped ]{color} background[, the camera pans {dir}]"

def caption(scene: Scene) -> str:
    noun = scene.shape + ("s" if scene.count > 1 else "")
    article = COUNT_WORDS.get(scene.count, "an" if scene.color[0] in "aeiou" else "a")
    stripes = "striped " if scene.pattern == "striped" else ""
    text = (f"{article} {scene.color} {noun} {MOTION_PHRASES[scene.motion]} "
            f"on a {stripes}{scene.background} background")
    return text + (f", the camera pans {scene.pan}" if scene.pan != "none" else "")


_SHAPE_WORDS = {"circle": "circle", "ball": "circle", "dot": "circle", "disc": "circle", "disk": "circle",
                "square": "square", "box": "square", "block": "square", "triangle": "triangle", "star": "star"}
_PLURALS = {w + "es" if w.endswith("x") else w + "s": s for w, s in _SHAPE_WORDS.items()}
_COLOR_WORDS = {**{c: c for c in COLORS}, "grey": "gray", "violet": "purple", "magenta": "pink", "teal": "cyan"}
_NUMBER_WORDS = {"one": 1, "1": 1, "single": 1, "two": 2, "2": 2, "pair": 2, "three": 3, "3": 3}
_MOTION_WORDS = {
    **{d: d for d in ("left", "right", "up", "down")}, "leftward": "left", "leftwards": "left",
    "rightward": "right", "rightwards": "right", "upward": "up", "upwards": "up", "rising": "up", "rises": "up",
    "downward": "down", "downwards": "down", "falling": "down", "falls": "down", "sinking": "down",
    **{w: "bouncing" for w in ("bouncing", "bounce", "bounces", "bouncy")},
    **{w: "spinning" for w in ("spinning", "spin", "spins", "rotating", "rotate", "rotates", "turning")},
    **{w: "pulsing" for w in ("pulsing", "pulse", "pulses", "pulsating", "throbbing")},
    **{w: "still" for w in ("still", "static", "stationary", "motionless", "resting", "idle")},
}
_PAN_WORDS = {"pan", "pans", "panning", "panned"}
_PATTERN_WORDS = {"striped": "striped", "stripes": "striped", "stripy": "striped", "stripey": "striped",
                  "plain": "plain", "solid": "plain"}
_BACKGROUND_WORDS = {"background", "backdrop", "bg"}
_PREPOSITIONS = {"on", "over", "against"}
_FILLER = {"a", "an", "the", "and", "with", "of", "in", "is", "are", "moving", "move", "moves", "going", "goes",
           "standing", "stands", "stand", "camera", "to", "while", "around", "shape", "shapes", "colored",
           "coloured"}


def parse_caption(text: str, strict: bool = False) -> tuple[Scene, list[str]]:
    """Read a prompt in (or near) the caption grammar; returns (scene, words not understood).

    Forgiving: word order is free, synonyms are known ("grey", "ball", "rotating", ...), and missing parts take
    `Scene`'s defaults, except that a missing color or background is chosen to contrast with the one given
    (white / black). A color is the background's when "background" follows it or "on"/"over"/"against" comes
    before it. Unknown words, numbers above three and words that contradict an earlier one (the second of
    "red blue") are returned, not fatal; `strict=True` raises ValueError listing them instead.
    Round trip: parse_caption(caption(s))[0] == s.
    """
    words = re.findall(r"[a-z]+|\d+", text.lower())
    found: dict[str, object] = {}
    unknown: list[str] = []

    def put(key, value, word):
        if found.setdefault(key, value) != value:
            unknown.append(word)

    plural = False
    i = 0
    while i < len(words):
        w = words[i]
        if w in _PAN_WORDS:  # "pans (to the) left": the direction belongs to the camera, not the objects
            j = i + 1
            while j < len(words) and words[j] in ("to", "the"):
                j += 1
            if j < len(words) and words[j] in ("left", "right"):
                put("pan", words[j], words[j])
                i = j
            else:
                unknown.append(w)
        elif w in _COLOR_WORDS:
            put("background" if _is_background(words, i) else "color", _COLOR_WORDS[w], w)
        elif w in _SHAPE_WORDS or w in _PLURALS:
            plural |= w in _PLURALS
            put("shape", _SHAPE_WORDS.get(w) or _PLURALS[w], w)
        elif w in _NUMBER_WORDS:
            put("count", _NUMBER_WORDS[w], w)
        elif w in _MOTION_WORDS:
            put("motion", _MOTION_WORDS[w], w)
        elif w in _PATTERN_WORDS:
            put("pattern", _PATTERN_WORDS[w], w)
        elif w not in _FILLER and w not in _BACKGROUND_WORDS and w not in _PREPOSITIONS:
            unknown.append(w)
        i += 1

    if strict and unknown:
        raise ValueError(f"prompt {text!r}: words not understood: {', '.join(unknown)}")
    found.setdefault("count", 2 if plural else 1)
    if "background" not in found:
        found["background"] = _contrasting(found.get("color"), ("black", "white"))
    if "color" not in found:
        found["color"] = _contrasting(found["background"], ("white", "black"))
    return Scene(**found), unknown


def _is_background(words: list[str], i: int) -> bool:
    after = [w for w in words[i + 1:i + 3] if w not in _PATTERN_WORDS]
    before = [w for w in words[max(0, i - 3):i] if w not in ("a", "an", "the", "of") and w not in _PATTERN_WORDS]
    return bool(after and after[0] in _BACKGROUND_WORDS) or bool(before and before[-1] in _PREPOSITIONS)


def _contrasting(other: str | None, candidates: tuple[str, ...]) -> str:
    """The first candidate that contrasts with `other`; the most contrasting one if none does (gray)."""
    good = [c for c in candidates if other is None or contrast(c, other) >= MIN_CONTRAST]
    return good[0] if good else max(candidates, key=lambda c: contrast(c, other))


# Synonym groups of the words `caption` writes (motion words only where they read as one: "moving left" ->
# "moving leftwards", "bouncing" -> "bouncy"); a training caption may use any of them.
_SYNONYMS = {w: [v for v, m in table.items() if m == meaning]
             for table in (_SHAPE_WORDS, _PLURALS, _COLOR_WORDS, _MOTION_WORDS) for w, meaning in table.items()}


def caption_words() -> list[str]:
    """Every word that `caption` or `caption_variant` can write (the demo text encoder's vocabulary)."""
    words = {w for group in _SYNONYMS.values() for w in group} | set(COUNT_WORDS.values())
    words |= {w for phrase in MOTION_PHRASES.values() for w in phrase.split()}
    return sorted(words | {"a", "an", "on", "striped", "background", "the", "camera", "pans", ","})


def caption_variant(scene: Scene, rng: np.random.Generator, p_synonym: float = 0.2, p_omit: float = 0.5) -> str:
    """A random phrasing of `scene` that `parse_caption` reads back as `scene`: the parts it fills in by default
    may be left out ("standing still", a plain background of the default color; each with probability p_omit)
    and words may become synonyms ("grey", "ball", "rotating"; each with p_synonym). The camera's direction is
    kept as it is ("pans left" must stay "left")."""
    text = caption(scene)
    if rng.random() < p_omit:
        text = text.replace(" standing still", "")
    if scene.pattern == "plain" and rng.random() < p_omit:
        text = text.replace(f" on a {scene.background} background", "")
    head, sep, tail = text.partition(", the camera")
    head = " ".join(rng.choice(_SYNONYMS[w]) if w in _SYNONYMS and rng.random() < p_synonym else w
                    for w in head.split())
    text = head + sep + tail
    return text if parse_caption(text)[0] == scene else caption(scene)


# ---------------------------------------------------------------------------------------------------------------
# Color science: sRGB -> CIELAB (D65), for perceptual color naming

_SRGB_TO_LINEAR = np.where((v := np.arange(256) / 255) <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
_RGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_WHITE = np.array([0.9505, 1.0, 1.089])


def to_lab(frames: np.ndarray) -> np.ndarray:
    """uint8 sRGB (..., 3) -> float32 CIELAB (..., 3)."""
    lin = _SRGB_TO_LINEAR.astype(np.float32)[frames]
    xyz = lin @ (_RGB_TO_XYZ.T / _WHITE).astype(np.float32)
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


PALETTE_RGB = np.array(list(PALETTE.values()), np.float32) / 255  # (C, 3) in [0, 1]
PALETTE_LAB = to_lab(np.array(list(PALETTE.values()), np.uint8)).astype(np.float64)  # (C, 3)
# Background stripes and bands mix a color with this shade: 20% darker (black: 15% lighter), which keeps its
# name under nearest-palette naming (tested) while reading clearly as a pattern.
SHADE_RGB = np.where(PALETTE_LAB[:, :1] > 20, 0.8 * PALETTE_RGB, 0.85 * PALETTE_RGB + 0.15).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Layout and motion: closed-form functions of the absolute frame index

RADIUS = {1: (0.13, 0.17), 2: (0.10, 0.13), 3: (0.085, 0.11)}  # object size by count, short sides
MOVE_SPEED = (0.008, 0.012)  # short sides per frame (0.5-0.8 px/frame at 64 px)
SPIN_SPEED = (2 * np.pi / 96, 2 * np.pi / 64)  # radians per frame (15-22 degrees per latent frame)
PULSE_PERIOD, PULSE_AMPLITUDE = 40.0, 0.25  # frames; relative size change
FORMATION = 0.4  # spread of a travelling group along its direction, short sides
PAN_SPEED = 0.01  # background scroll, short sides per frame
STRIPE_PERIOD, BAND_PERIOD, BAND_DEPTH = 0.25, 0.5, 0.5  # striped / plain background texture

# Shapes other than the circle are regular stars: n tips at `outer`, n inner corners at `inner` (unit size); a
# square is the 4-star whose inner corners lie on its edges, a triangle the 3-star. `tip`: where the first tip
# points at rotation 0 (y down: -pi/2 is up), so that squares sit square and triangles and stars point up.
STARS = {"square": (4, 0.88 * np.sqrt(2), 0.88, -np.pi / 4), "triangle": (3, 1.3, 0.65, -np.pi / 2),
         "star": (5, 1.35, 0.6, -np.pi / 2)}
REACH = {"circle": 1.0, **{shape: outer for shape, (_, outer, _, _) in STARS.items()}}


def _half_planes(poly: np.ndarray) -> np.ndarray:
    """Convex polygon (V, 2) -> its edges as (V, 3) rows (nx, ny, d): n outward unit normal, n . p - d > 0 outside."""
    e = np.roll(poly, -1, 0) - poly
    n = np.stack([e[:, 1], -e[:, 0]], -1) / np.linalg.norm(e, axis=-1, keepdims=True)
    n *= np.where(((poly.mean(0) - poly) * n).sum(-1) > 0, -1, 1)[:, None]
    return np.concatenate([n, (n * poly).sum(-1, keepdims=True)], -1)


def _pieces(n: int, outer: float, inner: float) -> list[np.ndarray]:
    """A regular star, first tip on the +x axis, as a union of convex pieces: the polygon of its tips when that
    is convex; else the polygon of its inner corners and one triangle per tip. Each tip triangle reaches 0.3
    (in size units) into the inner polygon: abutting pieces would leave a half-covered seam where they meet."""
    a = np.arange(n) * 2 * np.pi / n
    tips = outer * np.stack([np.cos(a), np.sin(a)], -1)
    if inner >= outer * np.cos(np.pi / n) - 1e-9:
        return [_half_planes(tips)]
    corners = inner * np.stack([np.cos(a + np.pi / n), np.sin(a + np.pi / n)], -1)
    pieces = [_half_planes(corners)]
    for k in range(n):
        planes = _half_planes(np.stack([corners[k - 1], tips[k], corners[k]]))
        planes[planes[:, 2].argmin(), 2] += 0.3  # the base, nearest the centre, moves inwards
        pieces.append(planes)
    return pieces


PIECES = {shape: _pieces(n, outer, inner) for shape, (n, outer, inner, _) in STARS.items()}


@dataclass(frozen=True)
class Layout:
    """What a caption leaves to chance, anchored at frame t0. Arrays are per object (n = scene.count)."""

    t0: int
    pos: np.ndarray  # (n, 2) centres (x, y) at t0, short sides
    radius: np.ndarray  # (n,) base size, short sides
    angle: np.ndarray  # (n,) rotation at t0, radians
    vel: np.ndarray  # (n, 2) velocity for moving / bouncing, short sides per frame
    spin: np.ndarray  # (n,) radians per frame
    phase: np.ndarray  # (n,) pulse phase, radians
    offset: float  # background scroll at t0, short sides


def _reach(scene: Scene, radius: np.ndarray) -> np.ndarray:
    """Largest distance from an object's centre to its outline, over the whole motion."""
    return radius * REACH[scene.shape] * (1 + PULSE_AMPLITUDE if scene.motion == "pulsing" else 1)


def _sample_layout(scene: Scene, extent: np.ndarray, rng: np.random.Generator, t0: int,
                   keep: np.ndarray, angle_keep: np.ndarray, offset: float) -> Layout:
    """Random layout; the first len(keep) objects sit at `keep` (a prompt switch carries them over)."""
    n = scene.count
    radius = rng.uniform(*RADIUS[n]) * rng.uniform(0.9, 1.1, n)
    reach = _reach(scene, radius)
    lo, hi = np.zeros(2), extent.copy()  # where centres may go
    axis = {"left": 0, "right": 0, "up": 1, "down": 1}.get(scene.motion)
    if axis is not None:  # travel in formation, so the group leaves and comes back together
        lo[axis] = rng.uniform(0, max(extent[axis] - FORMATION, 0))
        hi[axis] = lo[axis] + FORMATION
    pos = _place(reach, lo, hi, extent, rng, _fit(scene, keep[:n], reach[:len(keep)], extent))
    angle = rng.uniform(0, 2 * np.pi, n) * (scene.motion == "spinning")
    angle[:len(angle_keep[:n])] = angle_keep[:n]
    speed = rng.uniform(*MOVE_SPEED)
    if scene.motion == "bouncing":  # one diagonal direction for the group, 35-55 degrees off the axes
        a = rng.uniform(np.radians(35), np.radians(55)) + np.pi / 2 * rng.integers(4)
        vel = np.tile(speed * np.array([np.cos(a), np.sin(a)]), (n, 1))
    else:
        unit = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}.get(scene.motion, (0, 0))
        vel = np.tile(speed * np.array(unit, float), (n, 1))
    spin = rng.uniform(*SPIN_SPEED) * rng.choice([-1, 1]) * np.ones(n) * (scene.motion == "spinning")
    phase = np.full(n, rng.uniform(0, 2 * np.pi))  # pulse in step
    return Layout(t0, pos, radius, angle, vel, spin, phase, offset)


def _fit(scene: Scene, keep: np.ndarray, reach: np.ndarray, extent: np.ndarray) -> np.ndarray:
    """Carried-over positions, pulled fully into view except along the axis the objects travel (wraps)."""
    lo, hi = reach[:, None], extent - reach[:, None]
    fitted = np.clip(keep, lo, np.maximum(lo, hi))
    axis = {"left": 0, "right": 0, "up": 1, "down": 1}.get(scene.motion)
    if axis is not None:
        fitted[:, axis] = keep[:, axis]
    return fitted


def _place(reach: np.ndarray, lo: np.ndarray, hi: np.ndarray, extent: np.ndarray, rng: np.random.Generator,
           fixed: np.ndarray) -> np.ndarray:
    """Non-overlapping centres in the box [lo, hi] and fully in view, after the `fixed` ones; rejection sampling,
    shrinking the gap when the box is crowded (the last try is kept even if it overlaps)."""
    pos = list(fixed)
    for i in range(len(fixed), len(reach)):
        a = np.maximum(lo, reach[i])
        b = np.maximum(a, np.minimum(hi, extent - reach[i]))
        for attempt in range(400):
            gap = 0.03 * (1 - attempt / 400)
            p = rng.uniform(a, b)
            if all(np.linalg.norm(p - q) > reach[i] + reach[j] + gap for j, q in enumerate(pos)):
                break
        pos.append(p)
    return np.array(pos, float).reshape(len(reach), 2)


@dataclass(frozen=True)
class Trajectory:
    """Where the objects and the background are at frames t: pos (T, n, 2), radius (T, n), angle (T, n), offset (T,)."""

    pos: np.ndarray
    radius: np.ndarray
    angle: np.ndarray
    offset: np.ndarray


def _trajectory(scene: Scene, layout: Layout, extent: np.ndarray, t: np.ndarray) -> Trajectory:
    dt = (t - layout.t0).astype(np.float64)[:, None]  # (T, 1)
    reach = _reach(scene, layout.radius)  # (n,)
    pos = layout.pos[None] + layout.vel[None] * dt[..., None]  # (T, n, 2) before wrapping / reflecting
    if scene.motion in ("left", "right", "up", "down"):  # leave one side, come back on the other
        period = extent + 2 * reach[:, None]  # (n, 2)
        pos = np.mod(pos + reach[:, None], period) - reach[:, None]
    elif scene.motion == "bouncing":  # triangle wave between the walls
        lo = reach[:, None]
        span = np.maximum(extent - 2 * lo, 1e-6)
        u = np.mod(pos - lo, 2 * span)
        pos = lo + span - np.abs(u - span)
    radius = layout.radius * (1 + PULSE_AMPLITUDE * np.sin(2 * np.pi * dt / PULSE_PERIOD + layout.phase)
                              if scene.motion == "pulsing" else np.ones_like(dt))
    offset = layout.offset + PAN_SPEED * dt[:, 0] * {"none": 0, "left": 1, "right": -1}[scene.pan]
    return Trajectory(pos, radius, layout.angle + layout.spin * dt, offset)


# ---------------------------------------------------------------------------------------------------------------
# Drawing: signed distances -> anti-aliased coverage, composited per object in a patch around it

def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, angle: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Fraction of each pixel covered: dx (T, 1, K), dy (T, K, 1) pixel offsets from the centre, angle (rotation)
    and r (size, pixels) (T, 1, 1). The signed distance (min over convex pieces of max over their edges; exact
    inside, a bound outside) ramps coverage over one pixel: anti-aliasing."""
    if shape == "circle":
        sdf = np.sqrt(dx * dx + dy * dy) - r
    else:
        theta = STARS[shape][3] + angle
        c, s = np.cos(theta), np.sin(theta)
        sdf = None
        for planes in PIECES[shape]:
            piece = None
            for nx, ny, d in planes:  # the edge's normal turned by theta: (c nx - s ny, s nx + c ny)
                v = ((c * nx - s * ny) * dx - d * r) + (s * nx + c * ny) * dy  # (T, K, K)
                piece = v if piece is None else np.maximum(piece, v, out=piece)
            sdf = piece if sdf is None else np.minimum(sdf, piece, out=sdf)
    return np.minimum(np.maximum(0.5 - sdf, 0), 1)


def _background(scene: Scene, offset: np.ndarray, height: int, width: int) -> np.ndarray:
    """The background varies along x only: float32 (T, W, 3) rows."""
    S = min(height, width)
    u = (np.arange(width) + 0.5)[None] / S - offset[:, None]  # (T, W) background coordinate
    if scene.pattern == "striped":  # anti-aliased square wave
        w = np.clip(0.5 - (np.abs(np.mod(u, STRIPE_PERIOD) - STRIPE_PERIOD / 2) - STRIPE_PERIOD / 4) * S, 0, 1)
    else:  # soft bands, so that a pan shows on a plain background too
        w = BAND_DEPTH * (0.5 + 0.5 * np.sin(2 * np.pi * u / BAND_PERIOD))
    i = COLORS.index(scene.background)
    return PALETTE_RGB[i] + (SHADE_RGB[i] - PALETTE_RGB[i]) * w[..., None].astype(np.float32)


def _draw(scene: Scene, path: Trajectory, height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3). All objects share one color, so they are drawn as one coverage map (each in a K x K
    patch around it, frame by frame), then blended over the background once per channel."""
    S = min(height, width)
    T = len(path.offset)
    cover = np.zeros((T, height, width), np.float32)
    for i in range(scene.count):
        c = path.pos[:, i] * S  # (T, 2) centre, pixels
        r = (path.radius[:, i] * S).astype(np.float32)[:, None, None]
        K = int(2 * np.ceil(_reach(scene, path.radius[:, i]).max() * S)) + 4  # patch side
        o = np.floor(c).astype(np.int64) - K // 2  # (T, 2) patch corner (x, y)
        k = np.arange(K)
        dx = (o[:, 0, None] + k + 0.5 - c[:, 0, None]).astype(np.float32)  # (T, K)
        dy = (o[:, 1, None] + k + 0.5 - c[:, 1, None]).astype(np.float32)
        a = _coverage(scene.shape, dx[:, None, :], dy[:, :, None],
                      path.angle[:, i].astype(np.float32)[:, None, None], r)  # (T, K, K)
        for t, (x0, y0) in enumerate(o):  # clip the patch to the frame; "over" compositing
            xa, xb, ya, yb = max(x0, 0), min(x0 + K, width), max(y0, 0), min(y0 + K, height)
            if xa < xb and ya < yb:
                view = cover[t, ya:yb, xa:xb]
                view += a[t, ya - y0:yb - y0, xa - x0:xb - x0] * (1 - view)
    bg = _background(scene, path.offset, height, width)[:, None]  # (T, 1, W, 3)
    color = PALETTE_RGB[COLORS.index(scene.color)]
    out = np.empty((T, height, width, 3), np.uint8)
    for ch in range(3):  # per channel: numpy broadcasts slowly over a trailing axis of 3
        out[..., ch] = (bg[..., ch] + (color[ch] - bg[..., ch]) * cover) * 255 + 0.5
    return out


def render_timeline(segments: Sequence[tuple[int, Scene]], num_frames: int, height: int, width: int,
                    seed: int | Sequence[int] = 0, start_frame: int = 0) -> np.ndarray:
    """Frames start_frame .. start_frame + num_frames of a video whose prompt changes at the given frames:
    segments = [(0, scene), (s1, scene1), ...] with increasing starts. uint8 (T, H, W, 3).

    At a switch, the first min(n_old, n_new) objects keep their position and orientation (pulled back into view
    if the new motion does not travel), the background keeps its scroll; colors, shapes, the background's color
    and the motion change at once. Everything else comes from `seed`, so any window of frames is the same
    whichever chunks it is rendered in.
    """
    for j, (s, scene) in enumerate(segments):
        if not isinstance(scene, Scene):
            raise TypeError(f"segment {j} (frame {s}): expected a Scene, got {type(scene).__name__}")
    starts = [s for s, _ in segments]
    if not segments or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"segments must start at frame 0 and have increasing starts, got starts {starts}")
    if num_frames < 1 or height < 1 or width < 1 or start_frame < 0:
        raise ValueError(f"bad clip size: num_frames={num_frames}, {height}x{width}, start_frame={start_frame}")
    seed = (seed,) if isinstance(seed, (int, np.integer)) else tuple(seed)
    extent = np.array([width, height], float) / min(height, width)
    t = np.arange(start_frame, start_frame + num_frames)
    out = np.empty((num_frames, height, width, 3), np.uint8)
    keep, angle, offset = np.zeros((0, 2)), np.zeros(0), 0.0
    for j, (s, scene) in enumerate(segments):
        layout = _sample_layout(scene, extent, np.random.default_rng((*seed, j)), s, keep, angle, offset)
        end = starts[j + 1] if j + 1 < len(segments) else None
        sel = (t >= s) & (t < end if end is not None else True)
        if sel.any():
            out[sel] = _draw(scene, _trajectory(scene, layout, extent, t[sel]), height, width)
        if end is None or end > t[-1]:  # later segments lie outside the window
            break
        carried = _trajectory(scene, layout, extent, np.array([end]))
        keep, angle, offset = carried.pos[0], carried.angle[0], float(carried.offset[0])
    return out


def render(scene: Scene, num_frames: int, height: int, width: int, seed: int | Sequence[int] = 0,
           start_frame: int = 0) -> np.ndarray:
    """Frames start_frame .. start_frame + num_frames of the clip of `scene` and `seed`. uint8 (T, H, W, 3)."""
    return render_timeline([(0, scene)], num_frames, height, width, seed, start_frame)


# ---------------------------------------------------------------------------------------------------------------
# Measurement: read a (possibly generated, blurry, noisy) video back into caption terms

MIN_BLOB = 0.003  # smallest object blob, fraction of the frame (12 px at 64x64); smaller ones are noise
_PALETTE_LAB32 = PALETTE_LAB.astype(np.float32)
_SHADE_LAB32 = to_lab(np.round(SHADE_RGB * 255).astype(np.uint8))


@dataclass(frozen=True)
class Blobs:
    """Connected blobs of object pixels of at least MIN_BLOB, one entry per blob over the whole video."""

    mask: np.ndarray  # (T, H, W) their pixels
    frame: np.ndarray  # (B,) frame of each blob
    x: np.ndarray  # (B,) centroid, pixels
    y: np.ndarray
    area: np.ndarray  # (B,) pixels
    edge: np.ndarray  # (B,) touches the frame's edge (may be part of an object)


@dataclass(frozen=True)
class Measurement:
    """Per-frame readings of a video of T frames. Positions are fractions of the width / height."""

    fg_color: list[str | None]  # dominant object color (None: no object seen)
    bg_color: list[str]  # most common color
    cx: np.ndarray  # (T,) centroid of the object pixels, nan where none
    cy: np.ndarray
    count: np.ndarray  # (T,) blobs of object pixels
    area: np.ndarray  # (T,) fraction of the frame covered by objects
    bg_shift: np.ndarray  # (T-1,) background scroll to the next frame, fractions of the width, + = rightwards
    blobs: Blobs  # the object pixels (mask) and every blob


def measure(frames: np.ndarray) -> Measurement:
    """Read a video in two passes. 1: name every pixel by its nearest palette color (CIELAB, after a 3x3 blur
    against noise); the most common name is the background; the object color is the vote of the other pixels,
    weighted by their distance from the background color (mixed pixels at blurred edges count little).
    2: object pixels are those nearer the object color than the background (or its stripe shade), which puts
    the outline at half coverage whatever passes behind it."""
    if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
            and frames.shape[-1] == 3):
        raise ValueError(f"measure expects uint8 frames (T, H, W, 3), got {type(frames).__name__} "
                         f"{getattr(frames, 'dtype', '')} {getattr(frames, 'shape', '')}")
    T, H, W, _ = frames.shape
    C = len(COLORS)
    rgb = _blur3(frames)
    r, g, b = (rgb[..., i].astype(np.int32) >> 2 for i in range(3))
    q = r << 12 | g << 6 | b  # (T, H, W) index into the lookup tables
    name_lut, lab_lut = _lab_lut()
    names = name_lut[q]  # (T, H, W)
    lab = [channel[q] for channel in lab_lut]  # L, a, b: (T, H, W) each
    dist = lambda ref: np.sqrt(sum((x - r[:, None, None]) ** 2 for x, r in zip(lab, ref.T)))  # ref (T, 3)
    tt = np.broadcast_to(np.arange(T)[:, None, None], names.shape)
    bg = np.bincount((tt * C + names).ravel(), minlength=T * C).reshape(T, C).argmax(1)  # (T,)
    other = names != bg[:, None, None]
    from_bg = dist(_PALETTE_LAB32[bg])
    votes = np.bincount((tt * C + names)[other], from_bg[other], T * C).reshape(T, C)
    fg = votes.argmax(1)
    near_bg = np.minimum(from_bg, dist(_SHADE_LAB32[bg]))
    blobs = _blobs(other.any((1, 2))[:, None, None] & (dist(_PALETTE_LAB32[fg]) < near_bg),
                   max(1, round(MIN_BLOB * H * W)))
    mask = blobs.mask
    count = np.bincount(blobs.frame, minlength=T)
    n = np.maximum(mask.sum((1, 2)), 1)
    cx = np.where(count > 0, (mask.sum(1) * (np.arange(W) + 0.5)).sum(1) / n / W, np.nan)
    cy = np.where(count > 0, (mask.sum(2) * (np.arange(H) + 0.5)).sum(1) / n / H, np.nan)
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return Measurement(fg_color=[COLORS[c] if k else None for c, k in zip(fg, count)],
                       bg_color=[COLORS[c] for c in bg], cx=cx, cy=cy, count=count, area=mask.mean((1, 2)),
                       bg_shift=_scroll(luma, mask) / W, blobs=blobs)


@functools.cache
def _lab_lut() -> tuple[np.ndarray, np.ndarray]:
    """Nearest palette color (N,) and CIELAB (3, N) of every RGB color quantized to 6 bits a channel (index
    r << 12 | g << 6 | b): naming a pixel becomes one lookup."""
    v = np.arange(64, dtype=np.uint8) * 4 + 2
    rgb = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 3)
    lab = to_lab(rgb)
    d2 = ((lab[:, None] - _PALETTE_LAB32) ** 2).sum(-1)
    return d2.argmin(1).astype(np.uint8), np.ascontiguousarray(lab.T)


def _blur3(frames: np.ndarray) -> np.ndarray:
    """3x3 mean over the frame axes of uint8 (T, H, W, 3), edges replicated."""
    p = np.pad(frames, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge").astype(np.uint16)
    p = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    return ((p[:, :, :-2] + p[:, :, 1:-1] + p[:, :, 2:] + 4) // 9).astype(np.uint8)


def _blobs(mask: np.ndarray, min_area: int) -> Blobs:
    """4-connected components of each frame of (T, H, W): the runs of each row are linked to the runs they touch
    in the next row, and every run takes the smallest run index of its component (min-propagation with
    pointer jumping over the run graph, a few vectorized passes)."""
    T, H, W = mask.shape
    flat = mask.ravel()
    start = flat.copy()  # a run starts at a blob pixel whose left neighbour (same row) is not one
    start.reshape(-1, W)[:, 1:] &= ~mask.reshape(-1, W)[:, :-1]
    run = np.cumsum(start) - 1  # (N,) run index of each pixel, valid on blob pixels
    below = np.zeros_like(mask)
    below[:, :-1] = mask[:, :-1] & mask[:, 1:]
    p = np.flatnonzero(below)
    a, b = run[p], run[p + W]  # (E,) pairs of runs touching vertically
    root = np.arange(run[-1] + 1)
    while not np.array_equal(root[a], root[b]):
        m = np.minimum(root[a], root[b])
        np.minimum.at(root, a, m)
        np.minimum.at(root, b, m)
        root = root[root]
    pix = np.flatnonzero(flat)
    ids, inverse, area = np.unique(root[run[pix]], return_inverse=True, return_counts=True)
    y, x = (pix // W) % H, pix % W
    on_edge = (x == 0) | (x == W - 1) | (y == 0) | (y == H - 1)
    keep = area >= min_area
    kept = np.zeros(mask.shape, bool)
    kept.ravel()[pix] = keep[inverse]
    centroid = lambda v: np.bincount(inverse, v + 0.5)[keep] / area[keep]
    return Blobs(mask=kept, frame=np.flatnonzero(start)[ids[keep]] // (H * W),  # a blob's id is one of its runs
                 x=centroid(x), y=centroid(y), area=area[keep],
                 edge=np.bincount(inverse, on_edge)[keep] > 0)


def _scroll(luma: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Horizontal background shift between consecutive frames, pixels (+ = rightwards): 1-D Lucas-Kanade on
    the column profile of the luma of background pixels (objects and their rims left out)."""
    bg = ~mask
    for _ in range(2):  # leave out the blurred rims of objects
        bg[:, 1:] &= bg[:, :-1].copy()
        bg[:, :-1] &= bg[:, 1:].copy()
        bg[:, :, 1:] &= bg[:, :, :-1].copy()
        bg[:, :, :-1] &= bg[:, :, 1:].copy()
    T, H, W = mask.shape
    kernel = (1, 2, 3, 2, 1)  # normalized convolution along x: smooth the sums and the counts, then divide
    smooth = lambda a: sum(w * np.pad(a, ((0, 0), (2, 2)))[:, i:i + W] for i, w in enumerate(kernel))
    num, den = smooth((luma * bg).sum(1)), smooth(bg.sum(1).astype(np.float32))  # (T, W)
    valid = den >= 0.25 * sum(kernel) * H
    profile = num / np.maximum(den, 1e-6)
    a, b = profile[:-1], profile[1:]
    gx = np.gradient((a + b) / 2, axis=1)
    v = valid[:-1] & valid[1:]
    return -(gx * (b - a) * v).sum(1) / np.maximum((gx * gx * v).sum(1), 1e-6)


def matches(frames: np.ndarray, scene: Scene) -> dict[str, bool | float]:
    """Does a video show `scene`? color / background: the named color in at least half of the frames (scores:
    the fraction); count: the largest number of blobs seen in at least 10% of the frames with objects
    (travelling objects leave and come back, objects pass each other); motion: from blob tracks, object area
    and mask change; pan: from the background scroll."""
    m = measure(frames)
    T, H, W = m.blobs.mask.shape
    S = min(H, W)
    color = float(np.mean([c == scene.color for c in m.fg_color]))
    background = float(np.mean([c == scene.background for c in m.bg_color]))
    counts = m.count[m.count > 0]
    seen = np.flatnonzero(np.bincount(counts, minlength=1) >= max(2, 0.1 * len(counts)))
    scroll = float(np.median(m.bg_shift)) * W / S if T > 1 else 0.0  # short sides per frame
    pan = {"none": abs(scroll) < PAN_SPEED / 3, "left": scroll > PAN_SPEED / 2,
           "right": scroll < -PAN_SPEED / 2}[scene.pan]
    return {"color": color >= 0.5, "color_score": color, "background": background >= 0.5,
            "background_score": background, "count": len(seen) > 0 and seen[-1] == scene.count,
            "motion": _motion_ok(m, scene.motion), "pan": pan}


HOLD = 0.9  # colours hold from a frame on when they are on screen in this share of the frames after it


def colours_hold_from(frames: np.ndarray, scene: Scene) -> int | None:
    """The first frame from which `scene`'s object and background colours hold (None: they never do): after a
    prompt switch, when the new prompt's colours are on screen. That frame shows both; of the frames from it on,
    HOLD show the background and, where any object is in view, its color. A frame with no object has no object color
    to read: the renderer's own clips of an object moving left or up, out of the frame and back, would otherwise
    fail a fifth to a quarter of 1.5 s windows."""
    m = measure(frames)
    background = np.array([b == scene.background for b in m.bg_color])
    color = np.array([f == scene.color for f in m.fg_color])
    seen = np.array([f is not None for f in m.fg_color])
    both, ok = background & color, background & (color | ~seen)
    share = np.cumsum(ok[::-1])[::-1] / np.arange(len(ok), 0, -1)  # share of the frames from each one on
    return next((j for j in range(len(ok)) if both[j] and share[j] >= HOLD), None)


def _steps(b: Blobs, S: int, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Displacements over `lag` frames (short sides per frame) of whole blobs matched to their nearest whole
    blob `lag` frames later, skipping matches that jump or change size a lot (objects meeting, leaving, noise).
    A lag of a few frames averages out the pixel steps of the binary mask."""
    whole = ~b.edge
    frame, x, y, area = b.frame[whole], b.x[whole] / S, b.y[whole] / S, b.area[whole]
    dx, dy = [np.zeros(0)], [np.zeros(0)]
    for t in np.unique(frame):
        i, j = np.flatnonzero(frame == t), np.flatnonzero(frame == t + lag)
        if len(j) == 0:
            continue
        d = np.hypot(x[j][None] - x[i][:, None], y[j][None] - y[i][:, None])  # (ni, nj)
        k = j[d.argmin(1)]
        ok = (d.min(1) < 0.03 * lag) & (area[k] < 1.5 * area[i]) & (area[i] < 1.5 * area[k])
        dx.append((x[k] - x[i])[ok] / lag)
        dy.append((y[k] - y[i])[ok] / lag)
    return np.concatenate(dx), np.concatenate(dy)


def _motion_ok(m: Measurement, motion: str) -> bool:
    """Thresholds sit halfway between what the renderer does (speeds 0.008-0.012, bounces 35-55 degrees off the
    axes) and rest, in short sides per frame."""
    T, H, W = m.blobs.mask.shape
    lag = min(4, T - 1)
    dx, dy = _steps(m.blobs, min(H, W), lag)
    if len(dx) < 3:
        return False
    vx, vy = float(np.median(dx)), float(np.median(dy))
    slow = np.hypot(vx, vy) < 0.0015
    seen = m.count > 0
    cv = float(m.area[seen].std() / m.area[seen].mean())  # size change
    mask = m.blobs.mask
    inter = (mask[:-lag] & mask[lag:]).sum((1, 2))
    union = (mask[:-lag] | mask[lag:]).sum((1, 2))
    change = float(np.median(1 - inter[union > 0] / union[union > 0]))  # shape change at rest
    axis = {"left": (dx, dy, -1), "right": (dx, dy, 1), "up": (dy, dx, -1), "down": (dy, dx, 1)}
    if motion in axis:  # every object travels that way, none across
        along, across, sign = axis[motion]
        v = float(np.median(along)) * sign
        return v > 0.004 and float(np.median(np.abs(across))) < 0.35 * v
    if motion == "bouncing":
        return min(np.median(np.abs(dx)), np.median(np.abs(dy))) > 0.0025
    if motion == "still":
        return slow and cv < 0.05 and change < 0.1
    if motion == "spinning":
        return slow and cv < 0.1 and change >= 0.1
    return slow and cv >= 0.1  # pulsing


# ---------------------------------------------------------------------------------------------------------------
# Training data

def to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, H, W) in [-1, 1], the VAE's input."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


def to_frames(video: torch.Tensor) -> np.ndarray:
    """float (3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3), for `measure`."""
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


class ClipDataset(torch.utils.data.Dataset):
    """`length` random captioned clips: item i is (video float (3, T, H, W) in [-1, 1], caption), the same for
    the same (seed, i) on every machine and in every DataLoader worker."""

    def __init__(self, length: int, num_frames: int = 81, height: int = 64, width: int = 64, seed: int = 0):
        self.length, self.num_frames, self.height, self.width, self.seed = length, num_frames, height, width, seed

    def __len__(self) -> int:
        return self.length

    def scene(self, i: int) -> Scene:
        return sample_scene(np.random.default_rng((self.seed, i, 0)))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        if not 0 <= i < self.length:
            raise IndexError(f"ClipDataset index {i} out of range 0..{self.length - 1}")
        scene = self.scene(i)
        frames = render(scene, self.num_frames, self.height, self.width, seed=(self.seed, i, 1))
        return to_video(frames), caption(scene)
