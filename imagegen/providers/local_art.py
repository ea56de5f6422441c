"""Offline cartoon animal pictures drawn with Pillow.

Every picture is a small "sticker" scene: a soft gradient background with a few
decorations, a chibi-style animal (big head, small seated body) and sometimes an
accessory.  Shapes are described in a unit square (0..1 on both axes, y down) and
mapped to pixels by :class:`_Pen`, which also applies the random pose (lean, scale,
shift, mirror), so every animal gets pose variation for free.

All randomness comes from ``random.Random(seed)``, so a given
``(animal, seed, size)`` always renders the same pixels.
"""
from __future__ import annotations

import colorsys
import copy
import math
import random

from PIL import Image, ImageDraw, ImageOps

__all__ = ["ANIMALS", "draw"]

LINE = 0.0075                 # outline width, in unit-square coordinates
INK = (58, 42, 48)            # warm near-black: pure black looks harsh on pastels
WHITE = (253, 251, 247)
PINK = (244, 150, 160)
BLUSH = (255, 110, 130, 80)   # translucent so it tints whatever fur is below
ACCENTS = ((230, 80, 100), (90, 150, 230), (250, 190, 60), (150, 100, 210), (70, 180, 140), (245, 130, 60))


# --------------------------------------------------------------------------- colour & geometry

def _shade(c, f):
    """Darken (f < 1) or lighten (f > 1) a colour; used for outlines and patches."""
    if f <= 1:
        return tuple(round(v * f) for v in c[:3])
    return tuple(round(v + (255 - v) * (f - 1)) for v in c[:3])


def _hsv(h, s, v, a=None):
    rgb = tuple(round(x * 255) for x in colorsys.hsv_to_rgb(h % 1.0, s, v))
    return rgb if a is None else rgb + (a,)


def _oval_pts(cx, cy, rx, ry, rot=0.0, n=64, a0=0.0, a1=360.0):
    """Points on a (possibly rotated) ellipse; angles in degrees, 90 = down."""
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    ts = [math.radians(a0 + (a1 - a0) * i / n) for i in range(n + 1 if a1 - a0 < 360 else n)]
    return [(cx + rx * math.cos(t) * c - ry * math.sin(t) * s,
             cy + rx * math.cos(t) * s + ry * math.sin(t) * c) for t in ts]


def _bezier(p0, p1, p2, p3, n=20):
    """Cubic Bezier samples: tails and branches need smooth curves."""
    return [tuple((1 - t) ** 3 * a + 3 * (1 - t) ** 2 * t * b + 3 * (1 - t) * t * t * c + t ** 3 * d
                  for a, b, c, d in zip(p0, p1, p2, p3)) for t in (i / n for i in range(n + 1))]


def _turn(pts, cx, cy, deg):
    """Rotate points about (cx, cy): lets accessories sit at a jaunty angle."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in pts]


def _star_pts(cx, cy, r, rot=0.0):
    return [(cx + r * (1 if i % 2 == 0 else 0.45) * math.cos(math.radians(rot - 90 + 36 * i)),
             cy + r * (1 if i % 2 == 0 else 0.45) * math.sin(math.radians(rot - 90 + 36 * i)))
            for i in range(10)]


def _heart_pts(x, y, r):
    return [(x + r * 0.96 * math.sin(t) ** 3,
             y - r * 0.06 * (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
            for t in (i * math.pi / 20 for i in range(40))]


class _Pen:
    """Draws unit-square shapes on an image through a similarity transform.

    Every shape becomes a polygon first, so rotated ellipses (ears, flippers),
    the whole-figure lean and the head tilt cost nothing extra per animal.
    """

    def __init__(self, img, angle=0.0, scale=1.0, shift=(0.0, 0.0), mirror=False, pivot=(0.5, 0.9)):
        self.d = ImageDraw.Draw(img, "RGBA")   # RGBA mode blends translucent fills onto RGB
        self.px = img.width
        self.k = scale * self.px               # pixels per unit of figure length
        c, s = math.cos(math.radians(angle)) * scale, math.sin(math.radians(angle)) * scale
        m = -1 if mirror else 1
        self.m = (c * m, -s, s * m, c)
        self.pivot, self.shift, self.pre = pivot, shift, None

    def tilted(self, deg, cx, cy):
        """A pen that first turns shapes about (cx, cy): tilts a head without the body."""
        pen = copy.copy(self)
        pen.pre = (math.cos(math.radians(deg)), math.sin(math.radians(deg)), cx, cy)
        return pen

    def pt(self, x, y):
        if self.pre:
            c, s, cx, cy = self.pre
            x, y = cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c
        a, b, c, d = self.m
        dx, dy = x - self.pivot[0], y - self.pivot[1]
        return ((self.pivot[0] + self.shift[0] + a * dx + b * dy) * self.px,
                (self.pivot[1] + self.shift[1] + c * dx + d * dy) * self.px)

    def shape(self, pts, fill, line=True):
        """Filled polygon; line=True outlines it in a darker tone of the fill, or pass a colour."""
        xy = [self.pt(x, y) for x, y in pts]
        if line:
            outline = _shade(fill, 0.6) if line is True else line
            self.d.polygon(xy, fill=fill, outline=outline, width=max(1, round(LINE * self.k)))
        else:
            self.d.polygon(xy, fill=fill)

    def oval(self, cx, cy, rx, ry, fill, line=True, rot=0.0):
        n = int(min(160, max(20, math.pi * (rx + ry) * self.k / 4)))  # ~4 px per segment
        self.shape(_oval_pts(cx, cy, rx, ry, rot, n), fill, line)

    def pair(self, cx, cy, rx, ry, fill, line=True, rot=0.0):
        """An oval at cx (left side, rotated rot) and its mirror image at 1 - cx."""
        self.oval(cx, cy, rx, ry, fill, line, rot)
        self.oval(1 - cx, cy, rx, ry, fill, line, -rot)

    def pair_shape(self, pts, fill, line=True):
        """A left-side polygon and its mirror image."""
        self.shape(pts, fill, line)
        self.shape([(1 - x, y) for x, y in pts], fill, line)

    def stroke(self, pts, color, w):
        """Polyline with round caps (opaque colours only: caps would double-blend)."""
        xy = [self.pt(x, y) for x, y in pts]
        wp = max(1.0, w * self.k)
        self.d.line(xy, fill=color, width=round(wp), joint="curve")
        r = wp / 2
        for x, y in (xy[0], xy[-1]):
            self.d.ellipse((x - r, y - r, x + r, y + r), fill=color)

    def tube(self, pts, color, w):
        """Thick outlined stroke, for tails and branches."""
        self.stroke(pts, _shade(color, 0.6), w + 2 * LINE)
        self.stroke(pts, color, w)

    def arc(self, cx, cy, rx, ry, a0, a1, color, w):
        self.stroke(_oval_pts(cx, cy, rx, ry, 0, 16, a0, a1), color, w)


# --------------------------------------------------------------------------- shared features

def _eye(pen, x, y, r, kind, ink=INK, iris=None):
    if kind == "happy":  # an upturned arc reads as a smiling squint
        pen.arc(x, y + r * 0.4, r * 0.95, r * 0.8, 200, 340, ink, r * 0.42)
        return
    if iris:
        pen.oval(x, y, r, r * 1.15, iris, line=ink)
        pen.oval(x, y + r * 0.05, r * 0.55, r * 0.85, INK, line=False)
    else:
        pen.oval(x, y, r, r * 1.15, INK, line=False)
    h = 0.42 if kind == "sparkle" else 0.32
    pen.oval(x - r * 0.3, y - r * 0.4, r * h, r * h, WHITE, line=False)
    pen.oval(x + r * 0.35, y + r * 0.42, r * 0.15, r * 0.15, WHITE, line=False)


def _face(pen, look, y, dx, r, ink=INK, iris=None):
    """Both eyes (open, squinting or winking) plus the optional blush."""
    for s, kind in zip((-1, 1), look.eyes):
        _eye(pen, 0.5 + s * dx, y, r, kind, ink, iris)
    if look.blush:
        pen.pair(0.5 - dx - r * 1.1, y + r * 1.9, r * 1.2, r * 0.7, BLUSH, line=False)


def _mouth(pen, x, y, w, kind, ink=INK):
    """Mouth of half-width w: an 'ω' (optionally open, with a tongue) or a plain smile."""
    if kind == "open":
        pen.shape(_oval_pts(x, y + w * 0.3, w * 0.8, w * 1.3, 0, 20, 0, 180), (190, 70, 80), line=ink)
        pen.oval(x, y + w * 1.05, w * 0.5, w * 0.35, (250, 140, 150), line=False)
    if kind == "smile":
        pen.arc(x, y - w * 0.3, w * 1.3, w * 0.9, 25, 155, ink, w * 0.25)
    else:
        for s in (-1, 1):
            pen.arc(x + s * w * 0.5, y, w * 0.5, w * 0.45, 0, 180, ink, w * 0.25)


def _nose(pen, x, y, w, color):
    """Rounded downward triangle: the cat/rabbit/lion nose."""
    pen.shape([(x - w, y - w * 0.55), (x + w, y - w * 0.55), (x + w * 0.25, y + w * 0.5),
               (x - w * 0.25, y + w * 0.5)], color)


def _button_nose(pen, x, y, rx, ry, color=INK):
    pen.oval(x, y, rx, ry, color, line=False)
    pen.oval(x - rx * 0.35, y - ry * 0.4, rx * 0.3, ry * 0.25, (255, 255, 255, 150), line=False)


def _whiskers(pen, x, y, color):
    for s in (-1, 1):
        for dy in (-0.018, 0.0, 0.018):
            pen.stroke([(x + s * 0.13, y + dy * 0.4), (x + s * 0.3, y + dy * 1.9 - 0.006)], color, 0.005)


def _body(pen, fur, belly, feet=None, y=0.71):
    """Seated body: round torso, belly patch, feet and front paws."""
    pen.oval(0.5, y, 0.18, 0.17, fur)
    pen.oval(0.5, y + 0.04, 0.11, 0.11, belly, line=False)
    pen.pair(0.415, y + 0.155, 0.065, 0.04, feet or fur)
    pen.pair(0.425, y + 0.06, 0.045, 0.055, fur)
    pen.oval(0.5, y - 0.11, 0.15, 0.05, (0, 0, 0, 30), line=False)  # head's shadow on the chest


# --------------------------------------------------------------------------- expression & accessories

class _Look:
    """Per-picture expression, head tilt and accessory, picked once so every animal shares them."""

    def __init__(self, rng):
        e = rng.random()
        self.eyes = (("open", "open") if e < 0.5 else ("sparkle", "sparkle") if e < 0.64
                     else ("happy", "happy") if e < 0.82 else ("open", "happy"))  # last: wink
        self.mouth = rng.choice(("w", "w", "open", "smile"))
        self.blush = rng.random() < 0.6
        self.extra = rng.choice((None, None, "bow", "hat", "crown", "flower", "scarf", "bowtie"))
        self.color = rng.choice(ACCENTS)
        self.tilt = rng.uniform(-18, 18)
        self.head = rng.uniform(-12, 12) if rng.random() < 0.6 else 0.0  # head tilt, degrees

    def neck(self, pen, y, w):
        """Draw neckwear (between body and head) and return the pen, tilted, for the head."""
        c, x = self.color, 0.5
        if self.extra == "scarf":
            pen.shape([(x + w * 0.3, y), (x + w * 0.72, y), (x + w * 0.8, y + w * 0.95),
                       (x + w * 0.42, y + w * 0.95)], c)
            pen.oval(x, y, w, w * 0.27, c)
            for i in (-0.5, 0.0, 0.5):
                pen.stroke([(x + w * (0.1 + i), y - w * 0.15), (x + w * (0.1 + i), y + w * 0.15)],
                           _shade(c, 1.45), w * 0.09)
        elif self.extra == "bowtie":
            ty = y + w * 0.3  # below the chin, which would otherwise hide it
            for s in (-1, 1):
                pen.shape([(x, ty), (x + s * w * 0.5, ty - w * 0.3), (x + s * w * 0.5, ty + w * 0.3)], c)
            pen.oval(x, ty, w * 0.12, w * 0.12, _shade(c, 0.8))
        return pen.tilted(self.head, 0.5, y)

    def top(self, pen, hat, bow):
        """Headwear at the hat anchor, or a bow/flower at the ear anchor."""
        c, (hx, hy), (bx, by) = self.color, hat, bow
        if self.extra == "hat":
            cone = _turn([(hx - 0.07, hy), (hx + 0.07, hy), (hx, hy - 0.17)], hx, hy, self.tilt)
            pen.shape(cone, c)
            for x, y in _turn([(hx + 0.006, hy - 0.05), (hx - 0.004, hy - 0.105)], hx, hy, self.tilt):
                pen.oval(x, y, 0.012, 0.012, WHITE, line=False)
            pen.oval(*cone[2], 0.025, 0.025, WHITE)
        elif self.extra == "crown":
            pts = [(hx - 0.08, hy), (hx + 0.08, hy), (hx + 0.085, hy - 0.08), (hx + 0.04, hy - 0.04),
                   (hx, hy - 0.095), (hx - 0.04, hy - 0.04), (hx - 0.085, hy - 0.08), (hx, hy - 0.025)]
            pts = _turn(pts, hx, hy, self.tilt * 0.5)
            pen.shape(pts[:-1], (250, 205, 80))
            pen.oval(*pts[-1], 0.014, 0.014, c)
        elif self.extra == "bow":
            for side in (-1, 1):
                pen.oval(bx + side * 0.04, by, 0.045, 0.028, c, rot=side * 20)
            pen.oval(bx, by, 0.018, 0.018, _shade(c, 0.85))
        elif self.extra == "flower":
            for i in range(5):
                a = math.radians(72 * i + self.tilt)
                pen.oval(bx + 0.026 * math.cos(a), by + 0.026 * math.sin(a), 0.022, 0.022, _shade(c, 1.3))
            pen.oval(bx, by, 0.016, 0.016, (250, 210, 80))


# --------------------------------------------------------------------------- animals

def _cat(pen, rng, look):
    fur, light, stripe = rng.choice((
        ((238, 160, 90), (252, 234, 208), (214, 122, 62)),     # ginger tabby
        ((162, 166, 178), (236, 237, 242), (124, 128, 142)),   # grey tabby
        ((72, 70, 82), (112, 108, 122), None),                 # black
        ((249, 246, 240), (255, 255, 255), None),              # white
        ((234, 212, 172), (250, 242, 226), (208, 172, 124))))  # cream
    iris = rng.choice(((120, 190, 90), (235, 190, 70), (110, 170, 220)))
    dark = fur[0] < 100  # closed eyes and whiskers must still show on black fur
    pen.tube(_bezier((0.6, 0.85), (0.9, 0.86), (0.86, 0.6), (0.76, 0.56)), fur, 0.05)
    _body(pen, fur, light)
    pen = look.neck(pen, 0.6, 0.17)
    pen.pair_shape([(0.27, 0.34), (0.45, 0.22), (0.28, 0.09)], fur)
    pen.pair_shape([(0.31, 0.29), (0.4, 0.23), (0.3, 0.15)], PINK, line=False)
    pen.oval(0.5, 0.4, 0.25, 0.215, fur)
    if stripe:
        for x in (0.45, 0.5, 0.55):
            pen.shape([(x - 0.016, 0.195), (x + 0.016, 0.195), (x, 0.26 - abs(x - 0.5))], stripe, line=False)
        for s in (-1, 1):
            for y in (0.41, 0.45):
                pen.stroke([(0.5 + s * 0.245, y), (0.5 + s * 0.2, y + 0.008)], stripe, 0.014)
    pen.pair(0.468, 0.485, 0.045, 0.035, light, line=False)
    _face(pen, look, 0.4, 0.1, 0.036, (235, 225, 215) if dark else INK, iris)
    _nose(pen, 0.5, 0.462, 0.02, PINK)
    _mouth(pen, 0.5, 0.48, 0.024, look.mouth)
    _whiskers(pen, 0.5, 0.48, (200, 195, 205) if dark else _shade(fur, 0.55))
    look.top(pen, (0.5, 0.2), (0.34, 0.23))


def _dog(pen, rng, look):
    fur, ear, light = rng.choice((
        ((218, 172, 108), (168, 116, 70), (250, 236, 210)),    # golden
        ((164, 116, 80), (112, 74, 52), (238, 214, 186)),      # brown
        ((250, 247, 240), (160, 116, 82), (255, 255, 255)),    # white, brown ears
        ((96, 86, 90), (64, 56, 60), (226, 190, 150)),         # black and tan
        ((236, 216, 180), (204, 164, 114), (255, 248, 236))))  # cream
    pen.tube(_bezier((0.63, 0.8), (0.72, 0.78), (0.78, 0.7), (0.8, 0.6)), fur, 0.045)
    _body(pen, fur, light, feet=light)
    pen = look.neck(pen, 0.6, 0.17)
    pen.oval(0.5, 0.41, 0.24, 0.21, fur)
    if rng.random() < 0.45:  # a patch over one eye
        pen.oval(0.5 + rng.choice((-1, 1)) * 0.1, 0.38, 0.075, 0.07, ear, line=False)
    pen.pair(0.265, 0.42, 0.065, 0.15, ear, rot=14)  # floppy ears hang over the head's edge
    pen.oval(0.5, 0.5, 0.105, 0.075, light, line=False)
    _face(pen, look, 0.39, 0.1, 0.033)
    _button_nose(pen, 0.5, 0.468, 0.04, 0.028)
    _mouth(pen, 0.5, 0.5, 0.026, look.mouth)
    look.top(pen, (0.5, 0.21), (0.33, 0.25))


def _fox(pen, rng, look):
    fur = rng.choice(((236, 128, 56), (228, 110, 50), (240, 150, 70), (222, 136, 80)))
    dark, light = (84, 58, 56), (254, 248, 238)
    pen.oval(0.72, 0.68, 0.085, 0.19, fur, rot=32)  # bushy tail with a white tip
    pen.oval(0.783, 0.58, 0.066, 0.076, light, rot=32)
    _body(pen, fur, light, feet=dark)
    pen = look.neck(pen, 0.6, 0.16)
    pen.pair_shape([(0.27, 0.34), (0.44, 0.235), (0.26, 0.07)], fur)
    pen.pair_shape([(0.3, 0.3), (0.39, 0.25), (0.275, 0.14)], light, line=False)
    pen.pair_shape([(0.26, 0.07), (0.263, 0.159), (0.319, 0.125)], dark, line=False)
    # A round crown over pointed cheek tufts and chin gives the fox its snout.
    lower = [(0.77, 0.46), (0.66, 0.5), (0.58, 0.555), (0.5, 0.58), (0.42, 0.555), (0.34, 0.5), (0.23, 0.46)]
    pen.shape(_oval_pts(0.5, 0.4, 0.25, 0.2, 0, 40, 180, 360) + lower, fur)
    mask = [(0.26, 0.42), (0.35, 0.435), (0.43, 0.48), (0.5, 0.52), (0.57, 0.48), (0.65, 0.435),
            (0.74, 0.42)] + lower
    pen.shape([(0.5 + (x - 0.5) * 0.96, 0.42 + (y - 0.42) * 0.95) for x, y in mask], light, line=False)
    _face(pen, look, 0.4, 0.1, 0.034)
    _button_nose(pen, 0.5, 0.535, 0.03, 0.021)
    look.top(pen, (0.5, 0.2), (0.33, 0.26))


def _owl(pen, rng, look):
    fur, belly, face = rng.choice((
        ((150, 108, 78), (236, 214, 184), (244, 228, 204)),    # brown
        ((142, 142, 154), (222, 222, 230), (238, 238, 242)),   # grey
        ((196, 136, 84), (244, 220, 176), (250, 234, 206)),    # tawny
        ((236, 234, 228), (252, 250, 246), (255, 255, 255))))  # snowy
    iris, beak = rng.choice(((250, 200, 60), (245, 150, 50))), (240, 160, 60)
    pen.tube(_bezier((0.08, 0.9), (0.35, 0.86), (0.65, 0.9), (0.94, 0.86)), (150, 100, 70), 0.04)
    pen.oval(0.82, 0.84, 0.035, 0.018, (120, 190, 100), rot=-30)  # a leaf on the branch
    pen.pair_shape([(0.31, 0.31), (0.41, 0.27), (0.25, 0.16)], _shade(fur, 0.85))  # ear tufts
    pen.oval(0.5, 0.56, 0.25, 0.3, fur)
    pen.oval(0.5, 0.69, 0.16, 0.15, belly, line=False)
    for x, y in ((0.44, 0.65), (0.56, 0.65), (0.5, 0.71), (0.42, 0.76), (0.58, 0.76)):
        pen.arc(x, y - 0.01, 0.025, 0.018, 20, 160, _shade(fur, 0.8), 0.007)
    pen.pair(0.265, 0.62, 0.065, 0.16, _shade(fur, 0.82), rot=-12)
    for dx in (-0.02, 0.0, 0.02):
        pen.pair(0.44 + dx, 0.865, 0.012, 0.022, beak)
    look.neck(pen, 0.57, 0.14)
    for s, kind in zip((-1, 1), look.eyes):
        x = 0.5 + s * 0.1
        pen.oval(x, 0.42, 0.12, 0.12, face, line=_shade(fur, 0.8))
        if kind == "happy":
            pen.arc(x, 0.44, 0.05, 0.04, 200, 340, INK, 0.016)
        else:
            pen.oval(x, 0.42, 0.075, 0.075, iris)
            _eye(pen, x, 0.42, 0.042, kind)
    pen.shape([(0.47, 0.47), (0.53, 0.47), (0.5, 0.535)], beak)
    if look.blush:
        pen.pair(0.33, 0.52, 0.04, 0.022, BLUSH, line=False)
    look.top(pen, (0.5, 0.27), (0.33, 0.28))


def _panda(pen, rng, look):
    black = rng.choice(((44, 42, 50), (40, 44, 56), (86, 66, 58)))  # last: the rare brown panda
    pen.oval(0.5, 0.71, 0.18, 0.17, WHITE)
    pen.oval(0.5, 0.635, 0.172, 0.06, black, line=False)  # dark shoulder band joins the arms
    pen.pair(0.415, 0.865, 0.07, 0.045, black)
    pen.pair(0.38, 0.72, 0.058, 0.095, black, rot=-20)
    if rng.random() < 0.4:  # a bamboo snack
        pen.tube([(0.36, 0.82), (0.44, 0.56)], (140, 200, 110), 0.025)
        pen.oval(0.45, 0.55, 0.04, 0.015, (110, 180, 90), rot=-50)
    pen = look.neck(pen, 0.6, 0.17)
    pen.pair(0.315, 0.24, 0.075, 0.075, black)
    pen.oval(0.5, 0.41, 0.25, 0.215, WHITE)
    pen.pair(0.405, 0.42, 0.058, 0.078, black, line=False, rot=35)  # drooping eye patches
    for s, kind in zip((-1, 1), look.eyes):
        x = 0.5 + s * 0.095
        if kind == "happy":
            pen.arc(x, 0.425, 0.025, 0.02, 200, 340, WHITE, 0.01)
        else:  # a white eye-ring keeps the dark eye visible on the dark patch
            pen.oval(x, 0.415, 0.026, 0.028, WHITE, line=False)
            _eye(pen, x + s * 0.004, 0.418, 0.018, kind)
    if look.blush:
        pen.pair(0.33, 0.5, 0.04, 0.022, BLUSH, line=False)
    _button_nose(pen, 0.5, 0.48, 0.03, 0.02, black)
    _mouth(pen, 0.5, 0.5, 0.022, look.mouth, black)
    look.top(pen, (0.5, 0.2), (0.34, 0.24))


def _penguin(pen, rng, look):
    dark = rng.choice(((40, 46, 64), (52, 58, 76), (34, 34, 40), (70, 90, 120)))
    orange = (250, 160, 60)
    pen.pair(0.425, 0.87, 0.065, 0.03, orange)
    pen.pair(0.285, 0.62, 0.05, 0.14, dark, rot=22)
    pen.oval(0.5, 0.55, 0.22, 0.31, dark)
    pen.oval(0.5, 0.66, 0.155, 0.19, WHITE, line=False)
    pen.pair(0.43, 0.41, 0.1, 0.1, WHITE, line=False)  # heart-shaped face
    if rng.random() < 0.35:  # emperor-style yellow cheek patches
        pen.pair(0.325, 0.43, 0.03, 0.05, (252, 210, 90), line=False, rot=-20)
    look.neck(pen, 0.565, 0.16)
    _face(pen, look, 0.4, 0.075, 0.03)
    pen.shape([(0.46, 0.455), (0.54, 0.455), (0.5, 0.5)], orange)
    look.top(pen, (0.5, 0.26), (0.36, 0.29))


def _rabbit(pen, rng, look):
    fur, inner = rng.choice((
        ((250, 248, 244), PINK), ((206, 170, 134), (240, 190, 180)), ((180, 180, 188), (236, 180, 190)),
        ((238, 220, 190), PINK), ((150, 116, 90), (226, 170, 160))))
    pen.oval(0.68, 0.83, 0.05, 0.05, WHITE)  # cotton tail
    _body(pen, fur, _shade(fur, 1.55))
    pen = look.neck(pen, 0.62, 0.16)
    flop = rng.choice((0, 0, -1, 1))  # sometimes one ear flops over
    for s in (-1, 1):
        cx, cy, rot = (0.5 + s * 0.15, 0.27, s * 55) if s == flop else (0.5 + s * 0.085, 0.22, s * 6)
        pen.oval(cx, cy, 0.055, 0.15, fur, rot=rot)
        pen.oval(cx, cy + 0.01, 0.028, 0.11, inner, line=False, rot=rot)
    pen.oval(0.5, 0.45, 0.23, 0.2, fur)
    _face(pen, look, 0.44, 0.095, 0.034)
    pen.shape([(0.488, 0.51), (0.512, 0.51), (0.512, 0.545), (0.488, 0.545)], WHITE, line=INK)  # teeth
    _nose(pen, 0.5, 0.492, 0.018, (240, 130, 150))
    _mouth(pen, 0.5, 0.508, 0.022, "w" if look.mouth == "open" else look.mouth)
    _whiskers(pen, 0.5, 0.51, _shade(fur, 0.55))
    look.top(pen, (0.5, 0.27), (0.4, 0.3))


def _bear(pen, rng, look):
    fur, light = rng.choice((
        ((150, 100, 66), (226, 190, 150)), ((196, 140, 84), (244, 212, 168)),   # brown, honey
        ((70, 60, 62), (200, 166, 130)), ((248, 246, 240), (255, 255, 255))))   # black, polar
    _body(pen, fur, light)
    pen = look.neck(pen, 0.6, 0.17)
    pen.pair(0.315, 0.245, 0.075, 0.075, fur)
    pen.pair(0.315, 0.25, 0.042, 0.042, light, line=False)
    pen.oval(0.5, 0.42, 0.245, 0.21, fur)
    pen.oval(0.5, 0.5, 0.1, 0.072, light)
    _face(pen, look, 0.4, 0.1, 0.032, INK if fur[0] > 100 else (235, 225, 215))
    _button_nose(pen, 0.5, 0.472, 0.04, 0.027)
    _mouth(pen, 0.5, 0.5, 0.024, look.mouth)
    look.top(pen, (0.5, 0.21), (0.33, 0.27))


def _frog(pen, rng, look):
    fur = rng.choice(((120, 196, 96), (150, 206, 90), (90, 180, 120), (104, 190, 150)))
    belly, dark = (236, 244, 190), _shade(fur, 0.7)
    iris = (236, 80, 60) if rng.random() < 0.2 else None  # red-eyed tree frog
    pen.pair(0.3, 0.81, 0.1, 0.065, fur)  # folded back legs
    pen.oval(0.5, 0.73, 0.2, 0.15, fur)
    pen.oval(0.5, 0.76, 0.12, 0.1, belly, line=False)
    for dx in (-0.03, 0.0, 0.03):
        pen.pair(0.41 + dx, 0.875, 0.018, 0.016, fur)
    pen.pair(0.24, 0.87, 0.05, 0.025, fur)
    body, pen = pen, pen.tilted(look.head, 0.5, 0.62)
    pen.pair(0.37, 0.36, 0.085, 0.08, fur)  # eyes bulge on top of the head
    pen.oval(0.5, 0.5, 0.27, 0.17, fur)
    look.neck(body, 0.665, 0.15)  # a frog has no neck: wear it under the chin
    for x, y in ((0.4, 0.46), (0.62, 0.44), (0.54, 0.39)):
        pen.oval(x, y, 0.02, 0.016, dark, line=False)
    for s, kind in zip((-1, 1), look.eyes):
        x = 0.5 + s * 0.13
        pen.oval(x, 0.36, 0.06, 0.056, WHITE, line=False)
        if kind == "happy":
            pen.arc(x, 0.375, 0.035, 0.028, 200, 340, INK, 0.014)
        else:
            _eye(pen, x, 0.365, 0.034, kind, iris=iris)
    if look.blush:
        pen.pair(0.31, 0.53, 0.045, 0.025, BLUSH, line=False)
    pen.pair(0.47, 0.47, 0.008, 0.006, dark, line=False)  # nostrils
    if look.mouth == "open":
        pen.shape(_oval_pts(0.5, 0.53, 0.1, 0.06, 0, 24, 0, 180), (190, 70, 80), line=INK)
        pen.oval(0.5, 0.565, 0.05, 0.022, (250, 140, 150), line=False)
    else:
        pen.arc(0.5, 0.5, 0.14, 0.06, 20, 160, INK, 0.011)
    look.top(pen, (0.5, 0.33), (0.37, 0.3))


def _lion(pen, rng, look):
    fur = rng.choice(((242, 196, 112), (236, 184, 100), (246, 208, 140)))
    mane = rng.choice(((206, 120, 60), (176, 98, 58), (226, 152, 70), (150, 84, 60)))
    light = (252, 238, 206)
    pen.tube(_bezier((0.62, 0.84), (0.86, 0.86), (0.84, 0.66), (0.8, 0.62)), fur, 0.025)
    pen.oval(0.8, 0.6, 0.035, 0.045, mane)  # tail tuft
    _body(pen, fur, light)
    body, pen = pen, pen.tilted(look.head, 0.5, 0.64)
    for i in range(14):  # scalloped mane
        a = math.radians(360 * i / 14)
        pen.oval(0.5 + 0.255 * math.cos(a), 0.41 + 0.235 * math.sin(a), 0.08, 0.08, mane)
    pen.oval(0.5, 0.41, 0.28, 0.26, mane, line=False)
    look.neck(body, 0.69, 0.15)  # over the mane, or the mane would hide it
    pen.pair(0.335, 0.25, 0.055, 0.055, fur)
    pen.pair(0.335, 0.255, 0.028, 0.028, _shade(mane, 1.3), line=False)
    pen.oval(0.5, 0.42, 0.21, 0.19, fur)
    pen.pair(0.465, 0.495, 0.05, 0.04, light, line=False)
    _face(pen, look, 0.4, 0.09, 0.032)
    _nose(pen, 0.5, 0.465, 0.024, (170, 100, 90))
    _mouth(pen, 0.5, 0.49, 0.024, look.mouth)
    look.top(pen, (0.5, 0.18), (0.34, 0.24))


def _pig(pen, rng, look):
    fur = rng.choice(((248, 190, 192), (250, 206, 196), (240, 176, 184)))
    snout = _shade(fur, 0.9)
    pen.tube(_oval_pts(0.7, 0.78, 0.03, 0.03, 0, 16, 180, 520), fur, 0.014)  # curly tail
    _body(pen, fur, _shade(fur, 1.3))
    pen = look.neck(pen, 0.6, 0.17)
    pen.oval(0.5, 0.42, 0.245, 0.21, fur)
    pen.pair_shape([(0.27, 0.31), (0.41, 0.23), (0.23, 0.13)], fur)
    pen.pair_shape([(0.29, 0.27), (0.37, 0.23), (0.25, 0.17)], snout, line=False)
    _face(pen, look, 0.39, 0.11, 0.032)
    pen.oval(0.5, 0.48, 0.075, 0.052, snout)
    pen.pair(0.475, 0.48, 0.012, 0.02, _shade(fur, 0.55), line=False)
    if look.mouth != "w":  # an 'ω' would clash with the snout
        _mouth(pen, 0.5, 0.545, 0.022, look.mouth)
    look.top(pen, (0.5, 0.21), (0.35, 0.25))


def _mouse(pen, rng, look):
    fur = rng.choice(((178, 178, 190), (206, 186, 160), (240, 238, 232), (150, 130, 120)))
    pen.tube(_bezier((0.62, 0.85), (0.95, 0.9), (0.95, 0.6), (0.82, 0.58)), (236, 170, 176), 0.014)
    _body(pen, fur, _shade(fur, 1.5))
    pen = look.neck(pen, 0.61, 0.16)
    pen.pair(0.3, 0.23, 0.115, 0.11, fur)
    pen.pair(0.3, 0.24, 0.075, 0.07, PINK, line=False)
    pen.oval(0.5, 0.44, 0.22, 0.19, fur)
    _face(pen, look, 0.42, 0.09, 0.034)
    _button_nose(pen, 0.5, 0.49, 0.022, 0.018, (236, 120, 140))
    _mouth(pen, 0.5, 0.51, 0.02, look.mouth)
    _whiskers(pen, 0.5, 0.5, _shade(fur, 0.55))
    look.top(pen, (0.5, 0.26), (0.32, 0.3))


def _koala(pen, rng, look):
    fur = rng.choice(((170, 172, 182), (150, 152, 164), (186, 180, 178)))
    _body(pen, fur, WHITE)
    if rng.random() < 0.5:  # eucalyptus sprig
        pen.stroke([(0.34, 0.58), (0.36, 0.8)], (110, 150, 110), 0.008)
        for y in (0.6, 0.66, 0.72):
            pen.oval(0.34, y, 0.03, 0.014, (120, 180, 140), rot=-30)
    pen = look.neck(pen, 0.6, 0.17)
    pen.pair(0.27, 0.28, 0.1, 0.095, fur)  # big fluffy ears
    pen.pair(0.265, 0.285, 0.06, 0.055, WHITE, line=False)
    pen.oval(0.5, 0.42, 0.24, 0.21, fur)
    _face(pen, look, 0.4, 0.12, 0.03)
    _button_nose(pen, 0.5, 0.46, 0.045, 0.06, (70, 64, 76))
    if look.mouth != "w":
        _mouth(pen, 0.5, 0.535, 0.022, look.mouth)
    look.top(pen, (0.5, 0.21), (0.36, 0.23))


def _tiger(pen, rng, look):
    fur = rng.choice(((244, 148, 60), (238, 134, 52), (250, 170, 80)))
    light, stripe = (255, 248, 236), (66, 50, 50)
    tail = _bezier((0.6, 0.85), (0.9, 0.86), (0.86, 0.6), (0.76, 0.56))
    pen.tube(tail, fur, 0.045)
    for i in (6, 11, 16):  # bands square across the tail
        (x0, y0), (x1, y1) = tail[i], tail[i + 1]
        k = 0.022 / math.dist(tail[i], tail[i + 1])  # half a band's length over the step's length
        nx, ny = (y0 - y1) * k, (x1 - x0) * k
        pen.stroke([(x0 - nx, y0 - ny), (x0 + nx, y0 + ny)], stripe, 0.012)
    _body(pen, fur, light)
    for s in (-1, 1):
        pen.stroke([(0.5 + s * 0.175, 0.64), (0.5 + s * 0.13, 0.66)], stripe, 0.014)
    pen = look.neck(pen, 0.6, 0.17)
    pen.pair(0.32, 0.245, 0.07, 0.07, fur)
    pen.pair(0.32, 0.25, 0.035, 0.035, light, line=False)
    pen.oval(0.5, 0.41, 0.25, 0.215, fur)
    for x in (0.45, 0.5, 0.55):
        pen.shape([(x - 0.017, 0.195), (x + 0.017, 0.195), (x, 0.27 - abs(x - 0.5) * 1.4)], stripe,
                  line=False)
    for y in (0.38, 0.44):
        pen.pair_shape([(0.252, y - 0.013), (0.252, y + 0.013), (0.33, y + 0.01)], stripe, line=False)
    pen.pair(0.46, 0.49, 0.06, 0.045, light, line=False)
    _face(pen, look, 0.4, 0.1, 0.034)
    _nose(pen, 0.5, 0.463, 0.022, (220, 120, 120))
    _mouth(pen, 0.5, 0.482, 0.024, look.mouth)
    _whiskers(pen, 0.5, 0.49, (90, 70, 70))
    look.top(pen, (0.5, 0.2), (0.34, 0.24))


def _chick(pen, rng, look):
    fur = rng.choice(((252, 220, 90), (250, 210, 110), (255, 230, 120)))
    orange = (246, 150, 60)
    pen.pair(0.43, 0.87, 0.055, 0.025, orange)
    pen.oval(0.5, 0.6, 0.24, 0.27, fur)
    pen.pair(0.48, 0.33, 0.018, 0.045, fur, rot=-25)  # tuft of head feathers
    pen.pair(0.28, 0.65, 0.05, 0.09, _shade(fur, 0.92), rot=40)
    if rng.random() < 0.45:  # still half in its eggshell
        zig = [(0.26 + 0.04 * i, 0.73 if i % 2 else 0.77) for i in range(13)]
        pen.shape(zig + _oval_pts(0.5, 0.77, 0.25, 0.13, 0, 30, 0, 180)[::-1], (250, 246, 236))
    look.neck(pen, 0.61, 0.15)
    _face(pen, look, 0.46, 0.08, 0.032)
    pen.shape([(0.46, 0.51), (0.54, 0.51), (0.5, 0.555)], orange)
    pen.shape([(0.465, 0.51), (0.535, 0.51), (0.5, 0.48)], _shade(orange, 1.2))
    look.top(pen, (0.5, 0.34), (0.4, 0.37))


_ARTISTS = {"cat": _cat, "dog": _dog, "fox": _fox, "owl": _owl, "panda": _panda, "penguin": _penguin,
            "rabbit": _rabbit, "bear": _bear, "frog": _frog, "lion": _lion, "pig": _pig, "mouse": _mouse,
            "koala": _koala, "tiger": _tiger, "chick": _chick}
ANIMALS: tuple[str, ...] = tuple(_ARTISTS)


# --------------------------------------------------------------------------- scene

def _background(size, rng):
    """Soft vertical gradient, one decoration style and a ground for the animal to sit on."""
    hue = rng.random()
    top = _hsv(hue, rng.uniform(0.12, 0.28), 1.0)
    bottom = _hsv(hue + rng.uniform(-0.08, 0.08), rng.uniform(0.28, 0.42), 0.94)
    strip = ImageOps.colorize(Image.linear_gradient("L").crop((0, 0, 1, 256)), top, bottom)
    # Stretch the column vertically first: a 2-D bilinear resize from 1 px wide is ~10x slower.
    img = strip.resize((1, size), Image.Resampling.BILINEAR).resize((size, size), Image.Resampling.NEAREST)
    pen = _Pen(img)
    style = rng.choice(("dots", "stars", "hills", "sun", "clouds", "hearts", "confetti"))
    if style == "dots":
        for row in range(8):
            for col in range(8):
                pen.oval((col + 0.5 * (row % 2) + 0.25) / 8, (row + 0.5) / 8, 0.018, 0.018,
                         (255, 255, 255, 110), line=False)
    elif style in ("stars", "hearts", "confetti"):
        for _ in range(30 if style == "confetti" else rng.randint(8, 14)):
            x, y, r = rng.uniform(0.04, 0.96), rng.uniform(0.04, 0.75), rng.uniform(0.018, 0.04)
            if abs(x - 0.5) < 0.3 and 0.12 < y:  # keep the animal's silhouette clear
                x = x - 0.3 if x < 0.5 else x + 0.3
            if style == "stars":
                pen.shape(_star_pts(x, y, r, rng.uniform(0, 72)), (255, 250, 220, 200), line=False)
            elif style == "hearts":
                pen.shape(_heart_pts(x, y, r), _hsv(rng.choice((0.95, 0.0, 0.9)), 0.35, 1.0, 170), line=False)
            else:
                pen.oval(x, y, r * 0.5, r * 0.25, _hsv(rng.random(), 0.45, 1.0, 190), line=False,
                         rot=rng.uniform(0, 180))
    elif style == "sun":
        sx = rng.choice((0.16, 0.84))
        for i in range(12):
            c, s = math.cos(math.radians(30 * i)), math.sin(math.radians(30 * i))
            pen.stroke([(sx + 0.1 * c, 0.16 + 0.1 * s), (sx + 0.14 * c, 0.16 + 0.14 * s)],
                       (255, 224, 120), 0.012)
        pen.oval(sx, 0.16, 0.075, 0.075, (255, 214, 100), line=(250, 180, 80))
    if style in ("clouds", "sun"):
        for _ in range(2 if style == "clouds" else 1):
            x, y = rng.choice((rng.uniform(0.08, 0.2), rng.uniform(0.8, 0.92))), rng.uniform(0.1, 0.45)
            for dx, dy, r in ((-0.045, 0.01, 0.035), (0.0, -0.01, 0.048), (0.05, 0.01, 0.035)):
                pen.oval(x + dx, y + dy, r * 1.2, r, (255, 255, 255, 210), line=False)
    if style == "hills":
        g = rng.uniform(0.22, 0.4)
        pen.oval(0.15, 1.02, 0.55, 0.25, _hsv(g, 0.32, 0.82), line=False)
        pen.oval(0.9, 1.05, 0.6, 0.26, _hsv(g + 0.04, 0.36, 0.76), line=False)
        pen.oval(0.5, 1.12, 0.8, 0.24, _hsv(g, 0.4, 0.72), line=False)
    else:
        pen.oval(0.5, 1.15, 0.9, 0.28, _hsv(rng.choice((hue, 0.28, 0.1)), 0.3, 0.86), line=False)
    return img


def draw(animal: str, seed: int, size: int) -> Image.Image:
    """Draw `animal` as a size x size RGB picture; the same (animal, seed, size) always gives the same pixels.

    ``animal`` must be one of :data:`ANIMALS` (case and surrounding spaces are
    ignored), otherwise ``ValueError`` is raised.  ``seed`` picks the background,
    fur colours, pose, expression and accessory.  Shapes are rendered on a larger
    canvas and downsampled with LANCZOS for smooth edges.
    """
    artist = _ARTISTS.get(animal.strip().lower()) if isinstance(animal, str) else None
    if artist is None:
        raise ValueError(f"unknown animal {animal!r}; choose one of: {', '.join(ANIMALS)}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    rng = random.Random(seed)
    # 2-4x supersampling for smooth edges, capped so large pictures stay fast and small in memory.
    big = min(size * 4, max(1024, size * 2), max(size, 3072))
    img = _background(big, rng)
    pen = _Pen(img, angle=rng.uniform(-7, 7), scale=rng.uniform(0.88, 1.0),
               shift=(rng.uniform(-0.05, 0.05), rng.uniform(-0.02, 0.03)), mirror=rng.random() < 0.5)
    look = _Look(rng)
    pen.oval(0.5, 0.895, 0.25, 0.035, (40, 30, 50, 45), line=False)  # contact shadow grounds the figure
    artist(pen, rng, look)
    return img.resize((size, size), Image.Resampling.LANCZOS) if big != size else img
