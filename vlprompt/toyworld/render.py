"""Scenes to small RGB images (numpy + PIL), deterministic for a numpy Generator.

Shapes are drawn at twice the output resolution and box-filtered down (anti-aliasing); the
pattern modulates the object's colour (a darker shade on stripes, dots or checks), so colour
stays readable whatever the pattern.
"""
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from .world import COLOURS, Scene

IMAGE_SIZE = 32
_SCALE = 2  # supersampling factor
RADIUS = {"small": (7.0, 8.5), "large": (11.0, 13.0)}  # object radius in output pixels
OFFSET = 7.0  # centre offset of left/right/top/bottom objects, output pixels
OFFSETS = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}


def _polygon(n: int, cx: float, cy: float, r: float, angle: float, inner: float = 0.0):
    """Regular polygon (or star when inner > 0: alternating radii r and inner * r)."""
    points, steps = [], 2 * n if inner else n
    for k in range(steps):
        radius = r * inner if inner and k % 2 else r
        a = angle + 2 * math.pi * k / steps - math.pi / 2
        points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return points


def _cross(cx: float, cy: float, r: float, angle: float):
    w = 0.36 * r  # half arm width
    arm = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm]


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int, outline: float = 0.0) -> np.ndarray:
    """[size, size] float mask in {0, 1} of a shape (its outline of width `outline` if > 0)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(outline)) if outline else 0
    fill = None if outline else 255
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=255 if outline else None, width=width)
    elif shape == "ring":  # a ring is its own outline; a drawn ring is two thin circles
        thickness = 0.38 * r
        if outline:
            draw.ellipse(box, outline=255, width=width)
            inner = r - thickness
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], outline=255, width=width)
        else:
            draw.ellipse(box, outline=255, width=max(1, round(thickness)))
    else:
        if shape == "square":
            points = _polygon(4, cx, cy, r * 1.2, angle + math.pi / 4)
        elif shape == "diamond":
            points = _polygon(4, cx, cy, r * 1.15, angle)
        elif shape == "triangle":
            points = _polygon(3, cx, cy + 0.2 * r, r * 1.2, angle)
        elif shape == "hexagon":
            points = _polygon(6, cx, cy, r, angle + math.pi / 6)
        elif shape == "star":
            points = _polygon(5, cx, cy, r * 1.15, angle, inner=0.45)
        elif shape == "cross":
            points = _cross(cx, cy, r, angle)
        else:
            raise ValueError(f"unknown shape {shape!r}")
        if outline:
            draw.line(points + points[:1], fill=255, width=width, joint="curve")
        else:
            draw.polygon(points, fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def pattern_mask(pattern: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size] in {0, 1}: 1 where the darker shade of the object's colour goes."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(5.0, 7.0) * _SCALE
    phase = rng.uniform(0, period)
    if pattern == "plain":
        return np.zeros((size, size), np.float32)
    if pattern == "striped":
        direction = rng.integers(3)  # horizontal, vertical, diagonal stripes
        coordinate = (y, x, (x + y) / math.sqrt(2))[direction]
        return (((coordinate + phase) % period) < period / 2).astype(np.float32)
    if pattern == "dotted":
        dy, dx = ((y + phase) % period) - period / 2, ((x + phase) % period) - period / 2
        return (dx * dx + dy * dy < (0.3 * period) ** 2).astype(np.float32)
    if pattern == "checkered":
        return ((((x + phase) // (period / 2)) + ((y + phase) // (period / 2))) % 2).astype(np.float32)
    raise ValueError(f"unknown pattern {pattern!r}")


def background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "dark":
        return np.full((size, size, 3), rng.uniform(15, 60), np.float32) + rng.normal(0, 4, (1, 1, 3))
    if kind == "light":
        return np.full((size, size, 3), rng.uniform(185, 235), np.float32) + rng.normal(0, 4, (1, 1, 3))
    if kind == "noisy":  # soft coloured blotches around a mid grey: coarse noise, upsampled smoothly
        cells = 4
        coarse = rng.uniform(70, 170) + rng.normal(0, 35, (cells, cells, 3))
        blotches = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        return np.asarray(blotches, np.float32)
    raise ValueError(f"unknown background {kind!r}")


def object_colour(name: str, rng: np.random.Generator) -> np.ndarray:
    """The named colour with a little per-image variation of brightness and tint."""
    rgb = np.array(COLOURS[name], np.float32)
    return np.clip(rgb * rng.uniform(0.85, 1.1) + rng.normal(0, 10, 3), 0, 255)


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """[size, size, 3] uint8 image of a scene."""
    big = size * _SCALE
    unit = size / IMAGE_SIZE * _SCALE  # output pixels at 32 px -> canvas pixels
    r = rng.uniform(*RADIUS[scene.size]) * unit
    ox, oy = OFFSETS[scene.position]
    offset = OFFSET * unit * (0.6 if scene.size == "large" else 1.0)
    cx = big / 2 + ox * offset + rng.normal(0, 1.0) * unit
    cy = big / 2 + oy * offset + rng.normal(0, 1.0) * unit
    angle = rng.uniform(-0.25, 0.25)  # radians; small, so a square never turns into a diamond
    outline = 1.6 * unit if scene.style == "drawing" else 0.0
    mask = shape_mask(scene.shape, cx, cy, r, angle, big, outline)[..., None]
    colour = object_colour(scene.colour, rng)
    paint = colour
    if scene.style == "photo":  # a drawing is an outline: it shows no pattern
        paint = colour * (1.0 - 0.3 * pattern_mask(scene.pattern, big, rng)[..., None])
    pixels = background(scene.background, big, rng) * (1.0 - mask) + paint * mask
    pixels = pixels.reshape(size, _SCALE, size, _SCALE, 3).mean(axis=(1, 3))  # box filter down
    if scene.tint != (1.0, 1.0, 1.0):
        pixels = pixels * np.array(scene.tint, np.float32)
    pixels = pixels + rng.normal(0, 6, pixels.shape)
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    if scene.blurry:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=1.0)))
    return image


def render_batch(scenes, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """[B, size, size, 3] uint8."""
    return np.stack([render(scene, rng, size) for scene in scenes])


# CLIP's input normalisation (the configs' INPUT.PIXEL_MEAN / PIXEL_STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_model_input(images: np.ndarray):
    """uint8 [B, H, W, 3] -> normalised float tensor [B, 3, H, W], as Dassl's test transform."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std
