"""The built-in synthetic bilingual dataset: rendered scenes of simple shapes with English and Chinese captions.

A scene is (colour, shape, position, count): 8 colours × 4 shapes × 4 positions × counts 1–3 = 384
distinct scenes. Captions name all four attributes, so captions and scenes correspond one to one;
templates vary the wording ("two red circles on the left" / "左边有两个红色的圆形"). Scenes are drawn
large (one object ≈ 1/3 of the image side) so they stay distinguishable at 32×32 pixels.

Everything is deterministic from (seed, split, index) and needs no files. The training split draws
scenes uniformly; the eval split is a seeded permutation of all scenes, so its first ≤ 384 samples are
distinct scenes and retrieval among them has exactly one right answer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

# (English, Chinese, RGB)
COLOURS = (
    ("red", "红色", (220, 30, 30)), ("green", "绿色", (30, 170, 40)), ("blue", "蓝色", (30, 70, 230)),
    ("yellow", "黄色", (245, 220, 20)), ("purple", "紫色", (140, 40, 190)), ("orange", "橙色", (250, 135, 10)),
    ("white", "白色", (250, 250, 250)), ("black", "黑色", (10, 10, 10)),
)
# (English singular, English plural, Chinese)
SHAPES = (
    ("circle", "circles", "圆形"), ("square", "squares", "正方形"),
    ("triangle", "triangles", "三角形"), ("cross", "crosses", "十字形"),
)
# (English phrase, Chinese, normalized region centre, objects laid out along x?)
POSITIONS = (
    ("on the left", "左边", (0.25, 0.5), False), ("on the right", "右边", (0.75, 0.5), False),
    ("at the top", "上面", (0.5, 0.25), True), ("at the bottom", "下面", (0.5, 0.75), True),
)
COUNTS = ((1, "a", "一个"), (2, "two", "两个"), (3, "three", "三个"))
NUM_SCENES = len(COLOURS) * len(SHAPES) * len(POSITIONS) * len(COUNTS)
# Object diameter (fraction of the image side) per count: one object fills its half of the image.
_DIAMETER = {1: 0.40, 2: 0.30, 3: 0.24}

EN_TEMPLATES = (
    "{obj} {pos}", "there {be} {obj} {pos}", "{pos}, {obj}", "a picture of {obj} {pos}",
    "{obj} {be} {pos} of the image", "an image with {obj} {pos}",
)
ZH_TEMPLATES = (
    "{pos}有{num}{colour}的{shape}", "{num}{colour}的{shape}在{pos}", "图片{pos}有{num}{colour}{shape}",
    "{pos}是{num}{colour}的{shape}", "这张图的{pos}有{num}{colour}的{shape}", "在{pos}可以看到{num}{colour}的{shape}",
)
_SPLITS = {"train": 0, "eval": 1}
Language = Literal["en", "zh", "both"]


class Scene(NamedTuple):
    colour: int
    shape: int
    position: int
    count: int  # 1..3

    @property
    def id(self) -> int:
        cs = self.colour * len(SHAPES) + self.shape
        return (cs * len(POSITIONS) + self.position) * len(COUNTS) + self.count - 1

    @staticmethod
    def from_id(scene_id: int) -> Scene:
        if not 0 <= scene_id < NUM_SCENES:
            raise ValueError(f"scene id {scene_id} is not in [0, {NUM_SCENES})")
        rest, count = divmod(scene_id, len(COUNTS))
        rest, position = divmod(rest, len(POSITIONS))
        colour, shape = divmod(rest, len(SHAPES))
        return Scene(colour, shape, position, count + 1)


def caption(scene: Scene, lang: str, template: int) -> str:
    """The caption of `scene` in 'en' or 'zh' with template number `template` (taken modulo the count)."""
    count, en_num, zh_num = COUNTS[scene.count - 1]
    colour_en, colour_zh, _ = COLOURS[scene.colour]
    shape_en, shapes_en, shape_zh = SHAPES[scene.shape]
    pos_en, pos_zh, _, _ = POSITIONS[scene.position]
    if lang == "en":
        obj = f"{en_num} {colour_en} {shape_en if count == 1 else shapes_en}"
        text = EN_TEMPLATES[template % len(EN_TEMPLATES)].format(obj=obj, pos=pos_en, be="is" if count == 1 else "are")
        capitalize = (template // len(EN_TEMPLATES)) % 2
        return text[0].upper() + text[1:] if capitalize else text
    if lang == "zh":
        template_zh = ZH_TEMPLATES[template % len(ZH_TEMPLATES)]
        return template_zh.format(pos=pos_zh, num=zh_num, colour=colour_zh, shape=shape_zh)
    raise ValueError(f"synthetic caption language must be 'en' or 'zh', got {lang!r}")


def all_captions() -> list[str]:
    """Every caption the generator can produce (the tokenizer-training corpus), in a fixed order."""
    variants = {"en": 2 * len(EN_TEMPLATES), "zh": len(ZH_TEMPLATES)}
    return [caption(Scene.from_id(s), lang, t) for s in range(NUM_SCENES) for lang in ("en", "zh")
            for t in range(variants[lang])]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: int, cx: float, cy: float, r: float, fill) -> None:
    if shape == 0:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == 1:
        s = r * 0.88  # same visual area as the circle, roughly
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == 2:
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:
        w = r * 0.36
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw `scene` as a uint8 [size, size, 3] image; `rng` jitters background, placement and size."""
    ss = 4 if size <= 64 else 2 if size <= 160 else 1  # supersampling for anti-aliased edges
    side = size * ss
    bg = tuple(int(v) for v in rng.integers(105, 150, size=3))
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    _, _, (rx, ry), along_x = POSITIONS[scene.position]
    n = scene.count
    diameter = _DIAMETER[n] * rng.uniform(0.9, 1.1)
    slot = 0.92 / n  # objects share 92% of the image side along the layout axis
    for i in range(n):
        along = 0.04 + slot * (i + 0.5) + rng.uniform(-1, 1) * max(0.0, slot - diameter) * 0.15
        across = rng.uniform(-0.03, 0.03)
        cx, cy = (along, ry + across) if along_x else (rx + across, along)
        _draw_shape(draw, scene.shape, cx * side, cy * side, diameter * side / 2, COLOURS[scene.colour][2])
    if ss > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-4, 5, size=(size, size, 3), dtype=np.int16)
    return np.clip(arr, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SyntheticSample:
    key: str
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    lang: str
    scene: Scene


@dataclass(frozen=True)
class SyntheticScenes:
    """Random-access synthetic samples: `scenes[i]` is deterministic from (seed, split, i)."""

    seed: int
    image_size: int
    language: Language = "both"
    split: Literal["train", "eval"] = "train"

    def __post_init__(self):
        if self.split not in _SPLITS:
            raise ValueError(f"synthetic split must be 'train' or 'eval', got {self.split!r}")
        if self.language not in ("en", "zh", "both"):
            raise ValueError(f"synthetic language must be 'en', 'zh' or 'both', got {self.language!r}")

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, _SPLITS[self.split], *key])

    @functools.cached_property
    def _eval_order(self) -> np.ndarray:
        return self._rng(NUM_SCENES).permutation(NUM_SCENES)

    def scene(self, index: int) -> Scene:
        if self.split == "eval":  # a seeded permutation of all scenes: distinct for index < NUM_SCENES
            return Scene.from_id(int(self._eval_order[index % NUM_SCENES]))
        return Scene.from_id(int(self._rng(index, 0).integers(NUM_SCENES)))

    def captions(self, index: int) -> dict[str, str]:
        """English and Chinese captions of sample `index` (templates drawn from its seed)."""
        rng = self._rng(index, 1)
        scene = self.scene(index)
        return {lang: caption(scene, lang, int(rng.integers(1 << 16))) for lang in ("en", "zh")}

    def __getitem__(self, index: int) -> SyntheticSample:
        scene = self.scene(index)
        lang = self.language
        if lang == "both":
            lang = "en" if self._rng(index, 2).integers(2) == 0 else "zh"
        image = render(scene, self.image_size, self._rng(index, 3))
        key = f"{self.split}-{self.seed}-{index:08d}"
        return SyntheticSample(key, image, self.captions(index)[lang], lang, scene)
