"""A learnable synthetic vision-language world: BUTD-like region features and grounded English captions.

No real dataset can be downloaded everywhere, so the demo pre-training run and the tests use this world.
Each image is a scene of a few objects (class, colour, size, box on a unit canvas). The detector view of it is
what UNITER reads from one `.npz` per image (reference/loader.md): `features` (n, 2048) fp16, `norm_bb`
(n, 6) fp16, `conf` (n, 1) fp16, `soft_labels` (n, 1601) fp16, regions sorted by descending confidence.
Every object gives one tight, confident region plus 0-2 part regions; the rest are low-confidence clutter.
Features are class + colour + size prototypes plus noise through a ReLU, so a masked colour or class word is
predictable from the regions. Captions state only true facts about the scene.

Image coordinates: x grows to the right, y grows downwards (like BUTD boxes), so "above" means smaller y.
Spatial words, on the centres (cx, cy) of the objects' boxes:
  "to the left of" / "to the right of": cx differs by more than RELATION_MARGIN;
  "above" / "below": cy differs by more than RELATION_MARGIN;
  "next to": centres closer than NEXT_TO_DISTANCE.
  "on the left" / "on the right": cx < 0.4 / cx > 0.6; "at the top" / "at the bottom": cy < 0.4 / cy > 0.6;
  "in the middle": |cx - 0.5| < 0.15 and |cy - 0.5| < 0.15.
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

__all__ = [
    "CLASS_NAMES", "COLOURS", "SIZES", "STUFF_NAMES", "RELATIONS", "POSITIONS", "WorldConfig", "ImageRegions",
    "Caption", "SceneObject", "Scene", "WorldSplit", "make_world", "caption_tokenizer",
]

CLASS_NAMES: tuple[str, ...] = (
    "dog", "cat", "horse", "bird", "car", "bus", "truck", "bike", "boat", "train", "chair", "table",
    "lamp", "clock", "book", "cup", "bottle", "ball", "kite", "tree", "flower", "bag", "hat", "shoe",
)
COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow", "white", "black", "brown", "orange", "pink", "grey")
SIZES: tuple[str, ...] = ("small", "large")
# What clutter regions are detected as (labels only; never named in captions).
STUFF_NAMES: tuple[str, ...] = ("wall", "sky", "floor", "grass", "road", "window", "ground", "water")
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below", "next to")
POSITIONS: tuple[str, ...] = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")

RELATION_MARGIN = 0.1      # centres must differ by this much (fraction of the image) for left/right/above/below
NEXT_TO_DISTANCE = 0.35    # centres closer than this are "next to" each other
NUM_CONFUSABLE = 3         # classes a detector confuses each class with (soft-label mass)

_EXTENT = np.array([(0.12, 0.22), (0.30, 0.50)])   # per size: object width/height range, fraction of the image
_OBJECT_CONF = (0.80, 0.99)    # the tight box of an object
_PART_CONF = (0.45, 0.80)      # a part / loose box of an object
_CLUTTER_CONF = (0.20, 0.45)   # BUTD keeps boxes above 0.2
_PART_NOISE = 1.5              # parts are noisier views of their object
_FEATURE_BIAS = 0.3            # with unit-scale prototypes and noise: ReLU mean ~0.6-0.9, like pool5 features
_SCALES = {"class": 1.0, "colour": 0.7, "size": 0.4, "background": 0.5, "stuff": 0.5}
_CHUNK = 4096                  # regions per feature block: bounds the float32 scratch memory


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the synthetic world. Defaults: a demo of ~1500 train / 200 val images, 10..24 regions each."""

    seed: int = 0
    num_train_images: int = 1500
    num_val_images: int = 200
    captions_per_image: int = 5
    min_objects: int = 1
    max_objects: int = 4
    min_regions: int = 10
    max_regions: int = 24
    num_classes: int = 20
    num_colours: int = 8
    feature_noise: float = 1.0
    img_dim: int = 2048
    num_labels: int = 1601

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = numbers.Real if f.name == "feature_noise" else numbers.Integral
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"WorldConfig.{f.name} must be {'a number' if kind is numbers.Real else 'an integer'},"
                                 f" got {value!r}")
        self._check_range("seed", 0)
        self._check_range("num_train_images", 1)
        self._check_range("num_val_images", 1)
        self._check_range("captions_per_image", 1)
        self._check_range("min_objects", 1)
        self._check_range("max_objects", self.min_objects, len(COUNT_WORDS) - 1)
        self._check_range("min_regions", self.max_objects)   # every object needs its own region
        self._check_range("max_regions", self.min_regions)
        self._check_range("num_classes", NUM_CONFUSABLE + 1, len(CLASS_NAMES))
        self._check_range("num_colours", 1, len(COLOURS))
        self._check_range("feature_noise", 0.0)
        self._check_range("img_dim", 1)
        self._check_range("num_labels", 1 + self.num_classes + len(STUFF_NAMES))  # label 0 is background

    def _check_range(self, name: str, low: float, high: float | None = None) -> None:
        value = getattr(self, name)
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"WorldConfig.{name} must be {bound}, got {value!r}")


@dataclass(eq=False)
class ImageRegions:
    """One image as the BUTD extractor writes it: exactly the four arrays of the original's per-image .npz."""

    image_id: str
    features: np.ndarray     # (n, img_dim) float16, non-negative
    norm_bb: np.ndarray      # (n, 6) float16: [x1, y1, x2, y2, w, h] in [0, 1]
    conf: np.ndarray         # (n, 1) float16, descending
    soft_labels: np.ndarray  # (n, num_labels) float16, rows are distributions, background at index 0

    @property
    def num_regions(self) -> int:
        return len(self.conf)

    def arrays(self) -> dict[str, np.ndarray]:
        """The fields under their .npz names, e.g. for `np.savez_compressed(f"{image_id}.npz", **arrays())`."""
        return {"features": self.features, "norm_bb": self.norm_bb, "conf": self.conf,
                "soft_labels": self.soft_labels}


@dataclass
class Caption:
    text_id: str
    image_id: str
    text: str


@dataclass(frozen=True)
class SceneObject:
    """Ground truth of one object; its tight region's box is `box` (fp16-exact)."""

    name: str
    colour: str
    size: str
    label_id: int
    box: tuple[float, float, float, float]   # x1, y1, x2, y2 in [0, 1]

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2


@dataclass(eq=False)
class Scene:
    """What an image really shows: its objects, and which object each region row belongs to."""

    objects: tuple[SceneObject, ...]
    region_object: np.ndarray   # (n,) int64, aligned with the ImageRegions rows: object index, -1 for clutter


@dataclass(eq=False)
class WorldSplit:
    images: dict[str, ImageRegions]   # insertion ordered
    captions: list[Caption]
    scenes: dict[str, Scene]          # same keys as images: the generator's ground truth
    label_names: dict[int, str]       # soft-label id -> name of every class and stuff label used

    @functools.cached_property
    def txt2img(self) -> dict[str, str]:
        return {c.text_id: c.image_id for c in self.captions}

    @functools.cached_property
    def img2txts(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {image_id: [] for image_id in self.images}
        for c in self.captions:
            out[c.image_id].append(c.text_id)
        return out


# ---- the world's fixed parts -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Prototypes:
    """Everything the seed fixes once for both splits."""

    class_label: np.ndarray     # (K,) label id of each class
    stuff_label: np.ndarray     # (S,) label id of each stuff kind
    confusable: np.ndarray      # (K, NUM_CONFUSABLE) other class indices each class is confused with
    signal: np.ndarray          # (K*C*2 + S, D) float32 noiseless pre-activation of every region kind


def _make_prototypes(rng: np.random.Generator, cfg: WorldConfig) -> _Prototypes:
    k, c, s, d = cfg.num_classes, cfg.num_colours, len(STUFF_NAMES), cfg.img_dim
    labels = rng.choice(np.arange(1, cfg.num_labels), size=k + s, replace=False)
    confusable = np.stack([rng.choice(np.delete(np.arange(k), i), NUM_CONFUSABLE, replace=False) for i in range(k)])
    cls = _SCALES["class"] * rng.standard_normal((k, d), dtype=np.float32)
    colour = _SCALES["colour"] * rng.standard_normal((c, d), dtype=np.float32)
    size = _SCALES["size"] * rng.standard_normal((len(SIZES), d), dtype=np.float32)
    background = _SCALES["background"] * rng.standard_normal(d, dtype=np.float32)
    stuff = _SCALES["stuff"] * rng.standard_normal((s, d), dtype=np.float32)
    # one row per (class, colour, size), row index = (class * C + colour) * 2 + size; then one per stuff kind
    objects = cls[:, None, None] + colour[None, :, None] + size[None, None, :]
    signal = np.concatenate([objects.reshape(k * c * len(SIZES), d), background + stuff]) + _FEATURE_BIAS
    return _Prototypes(labels[:k], labels[k:], confusable, signal.astype(np.float32))


# ---- one scene ----------------------------------------------------------------------------------------------

@dataclass
class _SceneDraft:
    """One image before features: objects as index arrays, regions sorted by confidence."""

    obj_class: np.ndarray    # (k,)
    obj_colour: np.ndarray   # (k,)
    obj_size: np.ndarray     # (k,)
    obj_box: np.ndarray      # (k, 4) fp16-exact
    boxes: np.ndarray        # (n, 4) fp16-exact x1 y1 x2 y2
    conf: np.ndarray         # (n,)
    owner: np.ndarray        # (n,) object index, -1 clutter
    is_part: np.ndarray      # (n,) bool
    stuff: np.ndarray        # (n,) stuff kind of a clutter region, -1 for object regions


def _fp16_exact(x: np.ndarray) -> np.ndarray:
    """Round to what fp16 storage keeps, so ground truth and stored boxes agree exactly."""
    return x.astype(np.float16).astype(np.float64)


def _object_boxes(rng: np.random.Generator, sizes: np.ndarray) -> np.ndarray:
    low, high = _EXTENT[sizes, 0, None], _EXTENT[sizes, 1, None]
    extent = low + (high - low) * rng.random((len(sizes), 2))
    centre = rng.uniform(extent / 2, 1 - extent / 2)
    return _fp16_exact(np.concatenate([centre - extent / 2, centre + extent / 2], axis=1))


def _part_boxes(rng: np.random.Generator, owner_boxes: np.ndarray) -> np.ndarray:
    """A sub-box covering 50-100% of each side of its object's box."""
    wh = owner_boxes[:, 2:] - owner_boxes[:, :2]
    frac = rng.uniform(0.5, 1.0, size=wh.shape)
    start = owner_boxes[:, :2] + rng.uniform(0, 1, size=wh.shape) * (1 - frac) * wh
    return _fp16_exact(np.concatenate([start, start + frac * wh], axis=1))


def _clutter_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    extent = rng.uniform(0.05, 0.7, size=(n, 2))
    start = rng.uniform(0, 1, size=(n, 2)) * (1 - extent)
    return _fp16_exact(np.concatenate([start, start + extent], axis=1))


def _draft_scene(rng: np.random.Generator, cfg: WorldConfig) -> _SceneDraft:
    k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    n = int(rng.integers(cfg.min_regions, cfg.max_regions + 1))
    obj_class = rng.integers(cfg.num_classes, size=k)
    obj_colour = rng.integers(cfg.num_colours, size=k)
    obj_size = rng.integers(len(SIZES), size=k)
    obj_box = _object_boxes(rng, obj_size)
    part_owner = rng.permutation(np.repeat(np.arange(k), rng.integers(0, 3, size=k)))[: n - k]
    n_clutter = n - k - len(part_owner)

    boxes = np.concatenate([obj_box, _part_boxes(rng, obj_box[part_owner]), _clutter_boxes(rng, n_clutter)])
    conf = np.concatenate([rng.uniform(*_OBJECT_CONF, size=k), rng.uniform(*_PART_CONF, size=len(part_owner)),
                           rng.uniform(*_CLUTTER_CONF, size=n_clutter)])
    owner = np.concatenate([np.arange(k), part_owner, np.full(n_clutter, -1)])
    is_part = np.concatenate([np.zeros(k, bool), np.ones(len(part_owner), bool), np.zeros(n_clutter, bool)])
    stuff = np.concatenate([np.full(n - n_clutter, -1), rng.integers(len(STUFF_NAMES), size=n_clutter)])
    order = np.argsort(-conf, kind="stable")   # BUTD stores boxes by descending confidence
    return _SceneDraft(obj_class, obj_colour, obj_size, obj_box,
                       boxes[order], conf[order], owner[order], is_part[order], stuff[order])


# ---- region arrays, vectorised over a whole split -----------------------------------------------------------

@dataclass
class _RegionTable:
    """Every region of a split, concatenated in image order."""

    kind: np.ndarray         # (N,) row of _Prototypes.signal
    noise_scale: np.ndarray  # (N,)
    top_label: np.ndarray    # (N,) the label the detector is most sure of
    others: np.ndarray       # (N, NUM_CONFUSABLE) labels that get some of the remaining mass
    conf: np.ndarray         # (N,)


def _region_table(rng: np.random.Generator, drafts: Sequence[_SceneDraft], protos: _Prototypes,
                  cfg: WorldConfig) -> _RegionTable:
    owner = np.concatenate([d.owner for d in drafts])
    offsets = np.cumsum([0] + [len(d.obj_class) for d in drafts[:-1]])
    # per-region object attributes; clutter rows (owner -1) pick up a neighbour's and are masked below
    global_owner = owner + np.repeat(offsets, [len(d.owner) for d in drafts])
    cls = np.concatenate([d.obj_class for d in drafts])[global_owner]
    colour = np.concatenate([d.obj_colour for d in drafts])[global_owner]
    size = np.concatenate([d.obj_size for d in drafts])[global_owner]
    stuff = np.concatenate([d.stuff for d in drafts])
    is_object = owner >= 0
    is_part = np.concatenate([d.is_part for d in drafts])

    n_object_kinds = cfg.num_classes * cfg.num_colours * len(SIZES)
    kind = np.where(is_object, (cls * cfg.num_colours + colour) * len(SIZES) + size, n_object_kinds + stuff)
    noise_scale = cfg.feature_noise * np.where(is_part, _PART_NOISE, 1.0)
    # clutter is confused with a random class and two of its confusables
    confuser = np.where(is_object, cls, rng.integers(cfg.num_classes, size=len(owner)))
    confused = protos.class_label[protos.confusable[confuser]]
    top_label = np.where(is_object, protos.class_label[cls], protos.stuff_label[stuff])
    clutter_others = np.concatenate([protos.class_label[confuser][:, None], confused[:, :-1]], axis=1)
    others = np.where(is_object[:, None], confused, clutter_others)
    conf = np.concatenate([d.conf for d in drafts])
    return _RegionTable(kind, noise_scale, top_label, others, conf)


def _features(rng: np.random.Generator, table: _RegionTable, protos: _Prototypes) -> np.ndarray:
    out = np.empty((len(table.kind), protos.signal.shape[1]), np.float16)
    for start in range(0, len(out), _CHUNK):
        rows = slice(start, start + _CHUNK)
        block = rng.standard_normal((len(table.kind[rows]), out.shape[1]), dtype=np.float32)
        block *= table.noise_scale[rows, None].astype(np.float32)
        block += protos.signal[table.kind[rows]]
        np.maximum(block, 0, out=block)   # pool5 features are post-ReLU
        out[rows] = block.astype(np.float16)
    return out


def _soft_labels(rng: np.random.Generator, table: _RegionTable, num_labels: int) -> np.ndarray:
    """conf on the top label (so conf = max non-background prob, as in BUTD), a little on confusables, rest bg."""
    n = len(table.conf)
    rest = 1.0 - table.conf
    share = rng.uniform(0.1, 0.4, size=n)[:, None] * rng.dirichlet(np.ones(NUM_CONFUSABLE), size=n)
    others = np.minimum(rest[:, None] * share, 0.9 * table.conf[:, None])   # keep the top label on top
    out = np.zeros((n, num_labels), np.float16)
    rows = np.arange(n)
    out[rows, table.top_label] = table.conf
    out[rows[:, None], table.others] = others
    out[:, 0] = rest - others.sum(axis=1)
    return out


def _norm_bb(boxes: np.ndarray) -> np.ndarray:
    wh = boxes[:, 2:] - boxes[:, :2]
    return np.concatenate([boxes, wh], axis=1).astype(np.float16)


# ---- captions -----------------------------------------------------------------------------------------------

def _plural(name: str) -> str:
    return name + ("es" if name.endswith(("s", "sh", "ch", "x")) else "s")


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _capitalise(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _noun_phrase(rng: np.random.Generator, obj: SceneObject) -> str:
    """'a small red dog', 'a dog', 'an orange cup': size and colour each said or not."""
    words = [obj.size] if rng.random() < 0.5 else []
    words += [obj.colour] if rng.random() < 0.8 else []
    return _with_article(" ".join(words + [obj.name]))


def _true_relations(a: SceneObject, b: SceneObject) -> list[str]:
    (ax, ay), (bx, by) = a.centre, b.centre
    holds = [ax < bx - RELATION_MARGIN, ax > bx + RELATION_MARGIN, ay < by - RELATION_MARGIN,
             ay > by + RELATION_MARGIN, np.hypot(ax - bx, ay - by) < NEXT_TO_DISTANCE]
    return [rel for rel, ok in zip(RELATIONS, holds) if ok]   # never empty: near centres are "next to"


def _true_positions(obj: SceneObject) -> list[str]:
    x, y = obj.centre
    holds = [x < 0.4, x > 0.6, y < 0.4, y > 0.6, abs(x - 0.5) < 0.15 and abs(y - 0.5) < 0.15]
    return [pos for pos, ok in zip(POSITIONS, holds) if ok]   # never empty: the leftover square is the middle


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _relation_caption(rng: np.random.Generator, objects: Sequence[SceneObject]) -> str:
    i, j = rng.permutation(len(objects))[:2]
    rel = _pick(rng, _true_relations(objects[i], objects[j]))
    a, b = _noun_phrase(rng, objects[i]), _noun_phrase(rng, objects[j])
    return _pick(rng, [f"{a} is {rel} {b}.", f"{a} {rel} {b}.", f"there is {a} {rel} {b}."])


def _position_caption(rng: np.random.Generator, objects: Sequence[SceneObject]) -> str:
    obj = objects[int(rng.integers(len(objects)))]
    pos, a = _pick(rng, _true_positions(obj)), _noun_phrase(rng, obj)
    return _pick(rng, [f"{a} {pos}.", f"there is {a} {pos}.", f"{a} can be seen {pos}."])


def _count_phrase(rng: np.random.Generator, same_class: Sequence[SceneObject]) -> str:
    """'two dogs' (every dog of the image), 'two red dogs' when they share the colour."""
    colours = {o.colour for o in same_class}
    colour = [colours.pop()] if len(colours) == 1 and rng.random() < 0.5 else []
    return " ".join([COUNT_WORDS[len(same_class)]] + colour + [_plural(same_class[0].name)])


def _list_caption(rng: np.random.Generator, objects: Sequence[SceneObject]) -> str:
    """Some of the image's classes; a class seen twice or more is counted in full."""
    names = list(dict.fromkeys(o.name for o in objects))
    chosen = rng.permutation(len(names))[: int(rng.integers(1, len(names) + 1))]
    groups = [[o for o in objects if o.name == names[i]] for i in chosen]
    items = [_noun_phrase(rng, g[0]) if len(g) == 1 else _count_phrase(rng, g) for g in groups]
    be = "is" if len(groups[0]) == 1 else "are"
    listed = _join(items)
    return _pick(rng, [f"a photo of {listed}.", f"an image of {listed}.", f"this picture shows {listed}.",
                       f"there {be} {listed}.", f"{listed} in a picture."])


def _caption(rng: np.random.Generator, objects: Sequence[SceneObject]) -> str:
    draw = rng.random()
    if len(objects) >= 2 and draw < 0.4:
        return _capitalise(_relation_caption(rng, objects))
    if draw < 0.7:
        return _capitalise(_list_caption(rng, objects))
    return _capitalise(_position_caption(rng, objects))


# ---- assembly -----------------------------------------------------------------------------------------------

def _scene_objects(draft: _SceneDraft, protos: _Prototypes) -> tuple[SceneObject, ...]:
    return tuple(
        SceneObject(CLASS_NAMES[c], COLOURS[col], SIZES[s], int(protos.class_label[c]), tuple(map(float, box)))
        for c, col, s, box in zip(draft.obj_class, draft.obj_colour, draft.obj_size, draft.obj_box)
    )


def _label_names(protos: _Prototypes) -> dict[int, str]:
    names = {0: "__background__"}
    names.update({int(label): name for label, name in zip(protos.class_label, CLASS_NAMES)})
    names.update({int(label): name for label, name in zip(protos.stuff_label, STUFF_NAMES)})
    return names


def _make_split(rng: np.random.Generator, name: str, num_images: int, protos: _Prototypes,
                cfg: WorldConfig) -> WorldSplit:
    drafts = [_draft_scene(rng, cfg) for _ in range(num_images)]
    table = _region_table(rng, drafts, protos, cfg)
    features = _features(rng, table, protos)
    soft_labels = _soft_labels(rng, table, cfg.num_labels)
    norm_bb = _norm_bb(np.concatenate([d.boxes for d in drafts]))
    conf = table.conf.astype(np.float16)[:, None]

    images: dict[str, ImageRegions] = {}
    scenes: dict[str, Scene] = {}
    captions: list[Caption] = []
    ends = np.cumsum([len(d.conf) for d in drafts])
    for i, (draft, end) in enumerate(zip(drafts, ends)):
        image_id = f"synth_{name}_{i:06d}"
        rows = slice(end - len(draft.conf), end)
        images[image_id] = ImageRegions(image_id, features[rows], norm_bb[rows], conf[rows], soft_labels[rows])
        scenes[image_id] = Scene(_scene_objects(draft, protos), draft.owner.astype(np.int64))
        captions += [Caption(f"{image_id}_{j}", image_id, _caption(rng, scenes[image_id].objects))
                     for j in range(cfg.captions_per_image)]
    return WorldSplit(images, captions, scenes, _label_names(protos))


def make_world(config: WorldConfig) -> dict[str, WorldSplit]:
    """The "train" and "val" splits of the world; the same config gives byte-identical arrays and texts."""
    proto_seed, train_seed, val_seed = np.random.SeedSequence(config.seed).spawn(3)
    protos = _make_prototypes(np.random.default_rng(proto_seed), config)
    return {
        "train": _make_split(np.random.default_rng(train_seed), "train", config.num_train_images, protos, config),
        "val": _make_split(np.random.default_rng(val_seed), "val", config.num_val_images, protos, config),
    }


def caption_tokenizer(split: WorldSplit, vocab_size: int):
    """The demo's WordPiece vocabulary, trained on a split's captions: the in-memory run and the text corpus
    written from the world (uniter_fast.data.convert.synthetic) both use it, so their token ids agree."""
    from uniter_fast.data.tokenizer import Tokenizer  # the world itself needs only numpy

    return Tokenizer.train([c.text for c in split.captions], vocab_size=vocab_size)
