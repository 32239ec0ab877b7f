"""The toy world's vocabulary: objects with composable attributes, their captions, class sets.

A scene is one object (shape, colour, pattern, size, position) on a background, photographed
(filled, possibly blurred) or drawn (outline only). Captions describe a random subset of the
attributes in plain English, as alt text does; pretraining sees every combination.

Class sets are compositional: a class is a combination of attribute values (e.g. colour and shape,
"red circle"); the base classes of a set use every value that its new classes use, in other
combinations, so zero-shot transfer to new classes is possible. The datasets are photographed
under a warm light (SOURCE) that pretraining never saw: zero-shot CLIP misreads some colours,
and what a prompt learner learns on base classes can carry over to new ones.
"""
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS = {  # name: RGB in [0, 255]
    "red": (215, 40, 35), "orange": (240, 135, 25), "yellow": (235, 215, 45), "green": (45, 165, 60),
    "blue": (40, 75, 215), "purple": (135, 55, 185), "pink": (240, 125, 180), "brown": (125, 75, 40),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
SIZES = ("small", "large")
POSITIONS = ("center", "left", "right", "top", "bottom")
BACKGROUNDS = ("dark", "light", "noisy")
STYLES = ("photo", "drawing")

# How the object appears in captions when an attribute is mentioned.
PATTERN_WORDS = {"plain": ("plain", "solid"), "striped": ("striped",), "dotted": ("dotted",),
                 "checkered": ("checkered",)}
POSITION_PHRASES = {"center": "in the center", "left": "on the left", "right": "on the right",
                    "top": "at the top", "bottom": "at the bottom"}
BACKGROUND_PHRASES = {"dark": "on a dark background", "light": "on a light background",
                      "noisy": "on a noisy background"}
# The openings of captions, by style and blur; they echo CLIP's prompt templates.
PHOTO_OPENINGS = ("a photo of a", "a photo of the", "a close-up photo of a", "a picture of a",
                  "an image of a", "a cropped photo of the")
BACKGROUND_OPENINGS = {"dark": ("a dark photo of the",), "light": ("a bright photo of a",), "noisy": ()}
BLURRY_OPENINGS = ("a blurry photo of a", "a blurry photo of the", "a low resolution photo of a",
                   "a bad photo of a")
DRAWING_OPENINGS = ("a drawing of a", "a sketch of a", "art of the", "a drawing of the")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    pattern: str
    size: str
    position: str
    background: str = "dark"
    style: str = "photo"
    blurry: bool = False
    tint: Tuple[float, float, float] = (1.0, 1.0, 1.0)  # RGB gains of the camera (white balance)


@dataclass(frozen=True)
class Domain:
    """How scenes are sampled apart from their class attributes (probabilities)."""
    backgrounds: Tuple[str, ...] = ("dark", "light", "noisy")
    background_weights: Tuple[float, ...] = (0.45, 0.4, 0.15)
    drawing: float = 0.15  # outline drawings instead of photos
    blurry: float = 0.15
    tint: Tuple[float, float, float] = (1.0, 1.0, 1.0)

    def sample(self, rng: np.random.Generator) -> Dict[str, object]:
        style = "drawing" if rng.random() < self.drawing else "photo"
        return dict(background=self.backgrounds[rng.choice(len(self.backgrounds), p=self.background_weights)],
                    style=style, blurry=bool(style == "photo" and rng.random() < self.blurry), tint=self.tint)


PRETRAINING = Domain()
# The datasets' camera: a warm white balance (incandescent light) that pretraining photos never
# had. Zero-shot CLIP misreads some colours under it; a prompt learner can learn to correct it.
WARM_LIGHT = (1.15, 1.0, 0.75)
# The source domain of the datasets, and a shifted one for domain generalisation: drawings on
# noisy backgrounds, a rare combination in pretraining (like sketches for ImageNet).
SOURCE = Domain(backgrounds=("dark", "light"), background_weights=(0.5, 0.5), drawing=0.0, blurry=0.1,
                tint=WARM_LIGHT)
SHIFTED = Domain(backgrounds=("noisy",), background_weights=(1.0,), drawing=1.0, blurry=0.0, tint=WARM_LIGHT)


def sample_scene(rng: np.random.Generator, domain: Domain = PRETRAINING, **fixed) -> Scene:
    """A random scene; attributes given in `fixed` (e.g. colour="red") are kept."""
    attributes = dict(shape=SHAPES[rng.integers(len(SHAPES))],
                      colour=list(COLOURS)[rng.integers(len(COLOURS))],
                      pattern=PATTERNS[rng.integers(len(PATTERNS))],
                      size=SIZES[rng.integers(len(SIZES))],
                      position=POSITIONS[rng.integers(len(POSITIONS))])
    attributes.update(domain.sample(rng))
    attributes.update(fixed)
    return Scene(**attributes)


@dataclass(frozen=True)
class CaptionStyle:
    """Probability that a caption mentions each attribute (alt text is incomplete) and that it
    names a wrong colour (alt text is noisy)."""
    size: float = 0.5
    colour: float = 0.85
    pattern: float = 0.6
    shape: float = 0.9
    position: float = 0.35
    background: float = 0.3
    wrong_colour: float = 0.05


def openings_of(scene: Scene) -> Tuple[str, ...]:
    if scene.style == "drawing":
        return DRAWING_OPENINGS
    if scene.blurry:
        return BLURRY_OPENINGS
    return PHOTO_OPENINGS + BACKGROUND_OPENINGS[scene.background]


def caption(scene: Scene, rng: np.random.Generator, style: CaptionStyle = CaptionStyle()) -> str:
    """One plain-English caption: '<opening> [size] [colour] [pattern] <shape|object> [where].'"""
    words = []
    if rng.random() < style.size:
        words.append(scene.size)
    if rng.random() < style.colour:
        colour = scene.colour
        if rng.random() < style.wrong_colour:
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
        words.append(colour)
    if scene.style == "photo" and rng.random() < style.pattern:  # drawings show no pattern
        options = PATTERN_WORDS[scene.pattern]
        words.append(options[rng.integers(len(options))])
    words.append(scene.shape if rng.random() < style.shape else ("object", "shape")[rng.integers(2)])
    openings = openings_of(scene)
    text = f"{openings[rng.integers(len(openings))]} {' '.join(words)}"
    if rng.random() < style.position:
        text += " " + POSITION_PHRASES[scene.position]
    if rng.random() < style.background:
        text += " " + BACKGROUND_PHRASES[scene.background]
    return with_articles(text) + "."


def with_articles(text: str) -> str:
    """'a orange square' -> 'an orange square'."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return " ".join(words)


def vocabulary_sentences() -> List[str]:
    """Sentences that together use every word a caption, class name or description can hold:
    their tokens are the rows of the token embedding the world uses."""
    sentences = list(PHOTO_OPENINGS + BLURRY_OPENINGS + DRAWING_OPENINGS)
    sentences += [o for openings in BACKGROUND_OPENINGS.values() for o in openings]
    sentences += list(SHAPES) + list(COLOURS) + list(SIZES) + ["object shape"]
    sentences += [w for words in PATTERN_WORDS.values() for w in words]
    sentences += list(POSITION_PHRASES.values()) + list(BACKGROUND_PHRASES.values())
    sentences += [f"{t}." for t in ("a", "object")]  # the full stop
    return sentences


# ---- class sets --------------------------------------------------------------------------------
AXES = {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS, "size": SIZES}


@dataclass(frozen=True)
class ClassSet:
    """Classes as combinations of two attribute axes; the first `n_base` are the base classes."""
    name: str
    axes: Tuple[str, str]  # e.g. ("colour", "shape"): class "red circle"
    classes: Tuple[Tuple[str, str], ...]
    n_base: int

    @property
    def classnames(self) -> List[str]:
        return [class_name(self.axes, values) for values in self.classes]

    def attributes(self, label: int) -> Dict[str, str]:
        return dict(zip(self.axes, self.classes[label]))

    def base(self) -> "ClassSet":
        return replace(self, classes=self.classes[:self.n_base])

    def new(self) -> "ClassSet":
        return replace(self, classes=self.classes[self.n_base:], n_base=len(self.classes) - self.n_base)


def class_name(axes: Sequence[str], values: Sequence[str]) -> str:
    """English order of adjectives: size, colour, pattern, then the noun (the shape or 'object')."""
    by_axis = dict(zip(axes, values))
    words = [by_axis[a] for a in ("size", "colour", "pattern") if a in by_axis]
    return " ".join(words + [by_axis.get("shape", "object")])


def diagonal_classes(first: Sequence[str], second: Sequence[str], n_classes: int) -> List[Tuple[str, str]]:
    """`n_classes` combinations, taken diagonal by diagonal: diagonal d pairs second[j] with
    first[(j + d) % len(first)]. Each diagonal uses every value of both axes (len(first) <=
    len(second)) and diagonals are disjoint, so if the base half spans at least one full
    diagonal, every value of a new class occurs in the base classes, in other combinations."""
    if len(first) > len(second):
        raise ValueError("the first axis must not have more values than the second")
    classes = [(first[(j + d) % len(first)], second[j]) for d in range(len(first)) for j in range(len(second))]
    if n_classes > len(classes):
        raise ValueError(f"{n_classes} classes asked, {len(classes)} combinations exist")
    return classes[:n_classes]


def make_class_set(name: str, axes: Tuple[str, str], n_classes: int,
                   values: Optional[Tuple[Sequence[str], Sequence[str]]] = None) -> ClassSet:
    """Classes over `values` of the two axes (default: all), diagonal by diagonal; the first
    ceil(n/2) are the base classes (CoOp's split) and must span at least two diagonals, so that
    within the base classes no single attribute tells the classes apart."""
    first, second = values or (AXES[axes[0]], AXES[axes[1]])
    classes = diagonal_classes(first, second, n_classes)
    n_base = -(-n_classes // 2)
    if n_base < 2 * len(second):
        raise ValueError(f"{name}: {n_base} base classes do not span two diagonals of {len(second)} classes")
    return ClassSet(name, axes, tuple(classes), n_base)


# The datasets: a source with many classes (ImageNet's role) and targets with other class sets.
CLASS_SETS = {
    "ToyObjects": make_class_set("ToyObjects", ("shape", "colour"), 36),
    "ToyPatterns": make_class_set("ToyPatterns", ("pattern", "shape"), 16,
                                  (PATTERNS, ("circle", "square", "triangle", "star"))),
    "ToyTextiles": make_class_set("ToyTextiles", ("pattern", "colour"), 16,
                                  (PATTERNS, ("red", "yellow", "blue", "purple"))),
}


def sample_class_scene(class_set: ClassSet, label: int, rng: np.random.Generator, domain: Domain = SOURCE) -> Scene:
    return sample_scene(rng, domain, **class_set.attributes(label))


def class_descriptions(class_set: ClassSet, n_per_class: int = 8, seed: int = 0) -> Dict[str, List[str]]:
    """Per-class texts in the release's gpt_file format {"class name": ["description", ...]}:
    the class name in the openings and phrases of captions, as in '<opening> [size] <class
    name> [where].' (a drawing shows no pattern, so pattern classes are described as photos)."""
    rng = np.random.default_rng(seed)
    domain = replace(PRETRAINING, drawing=0.0) if "pattern" in class_set.axes else PRETRAINING
    out = {}
    for label, name in enumerate(class_set.classnames):
        texts = []
        for _ in range(n_per_class):
            scene = sample_class_scene(class_set, label, rng, domain)
            size = f"{scene.size} " if "size" not in class_set.axes and rng.random() < 0.3 else ""
            text = f"{openings_of(scene)[rng.integers(len(openings_of(scene)))]} {size}{name}"
            if rng.random() < 0.3:
                text += " " + POSITION_PHRASES[scene.position]
            if rng.random() < 0.3:
                text += " " + BACKGROUND_PHRASES[scene.background]
            texts.append(with_articles(text) + ".")
        out[name] = texts
    return out
