"""The synthetic world: BUTD-shaped arrays, determinism, true captions and a learnable image signal."""
from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pytest

from uniter_fast.data.synthetic import (
    CLASS_NAMES, COLOURS, SIZES, WorldConfig, WorldSplit, make_world,
)

SMALL = WorldConfig(seed=3, num_train_images=160, num_val_images=60, captions_per_image=4)
NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


@pytest.fixture(scope="module")
def world() -> dict[str, WorldSplit]:
    return make_world(SMALL)


def _all_images(world):
    for split in world.values():
        for image_id, image in split.images.items():
            yield split, image_id, image


def _tight_region(split: WorldSplit, image_id: str, obj_index: int) -> int:
    """Row of an object's most confident region (rows are sorted by confidence)."""
    rows = np.flatnonzero(split.scenes[image_id].region_object == obj_index)
    assert len(rows) >= 1, f"{image_id}: object {obj_index} has no region"
    return int(rows[0])


def _centre(box) -> tuple[float, float]:
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return (x1 + x2) / 2, (y1 + y2) / 2


# ---- determinism -------------------------------------------------------------------------------------------

def _assert_same_world(a: dict[str, WorldSplit], b: dict[str, WorldSplit]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert list(a[name].images) == list(b[name].images)
        for image_id, image in a[name].images.items():
            other = b[name].images[image_id]
            for field in ("features", "norm_bb", "conf", "soft_labels"):
                x, y = getattr(image, field), getattr(other, field)
                assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), (image_id, field)
            assert a[name].scenes[image_id].objects == b[name].scenes[image_id].objects
        assert [dataclasses.astuple(c) for c in a[name].captions] == [dataclasses.astuple(c) for c in b[name].captions]


def test_same_seed_gives_byte_identical_world(world):
    _assert_same_world(world, make_world(SMALL))


def test_other_seed_gives_other_world(world):
    other = make_world(dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    first = next(iter(world["train"].images))
    a, b = world["train"].images[first], other["train"].images[first]
    assert a.features.shape != b.features.shape or not np.array_equal(a.features, b.features)
    texts = [c.text for c in world["train"].captions]
    other_texts = [c.text for c in other["train"].captions]
    assert texts != other_texts


def test_val_split_does_not_depend_on_train_size(world):
    bigger = make_world(dataclasses.replace(SMALL, num_train_images=SMALL.num_train_images + 7))
    _assert_same_world({"val": world["val"]}, {"val": bigger["val"]})


# ---- arrays ------------------------------------------------------------------------------------------------

def test_array_shapes_dtypes_and_ranges(world):
    for split, image_id, image in _all_images(world):
        n = image.features.shape[0]
        assert image.image_id == image_id
        assert SMALL.min_regions <= n <= SMALL.max_regions
        assert image.features.shape == (n, SMALL.img_dim) and image.features.dtype == np.float16
        assert image.norm_bb.shape == (n, 6) and image.norm_bb.dtype == np.float16
        assert image.conf.shape == (n, 1) and image.conf.dtype == np.float16
        assert image.soft_labels.shape == (n, SMALL.num_labels) and image.soft_labels.dtype == np.float16
        for field in ("features", "norm_bb", "conf", "soft_labels"):
            assert np.isfinite(getattr(image, field).astype(np.float32)).all(), (image_id, field)
        assert (image.features >= 0).all()   # post-ReLU like pool5


def test_feature_magnitudes_look_like_butd(world):
    means = [float(image.features.astype(np.float32).mean()) for _, _, image in _all_images(world)]
    assert 0.3 < np.mean(means) < 3.0
    zeros = np.mean([float((image.features == 0).mean()) for _, _, image in _all_images(world)])
    assert 0.05 < zeros < 0.95   # sparse but not dead, as ReLU features are


def test_boxes_are_normalised_with_width_and_height(world):
    for _, image_id, image in _all_images(world):
        bb = image.norm_bb.astype(np.float32)
        assert (bb >= 0).all() and (bb <= 1).all(), image_id
        assert (bb[:, 2] > bb[:, 0]).all() and (bb[:, 3] > bb[:, 1]).all(), image_id
        np.testing.assert_allclose(bb[:, 4], bb[:, 2] - bb[:, 0], atol=2e-3)
        np.testing.assert_allclose(bb[:, 5], bb[:, 3] - bb[:, 1], atol=2e-3)


def test_regions_sorted_by_descending_confidence(world):
    for _, image_id, image in _all_images(world):
        conf = image.conf[:, 0].astype(np.float32)
        assert (conf > 0).all() and (conf <= 1).all()
        assert (np.diff(conf) <= 0).all(), image_id


def test_soft_labels_are_distributions_with_background_first(world):
    for _, image_id, image in _all_images(world):
        soft = image.soft_labels.astype(np.float32)
        assert (soft >= 0).all()
        np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=5e-3)
        assert (soft[:, 0] > 0).all(), image_id   # some background mass everywhere
        # BUTD's conf is the best non-background class probability
        np.testing.assert_allclose(soft[:, 1:].max(axis=1), image.conf[:, 0].astype(np.float32), atol=1e-3)


def test_npz_fields_round_trip(world):
    image = next(iter(world["val"].images.values()))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **image.arrays())
    buffer.seek(0)
    loaded = np.load(buffer)
    assert sorted(loaded.files) == ["conf", "features", "norm_bb", "soft_labels"]
    for name in loaded.files:
        assert np.array_equal(loaded[name], getattr(image, name))


# ---- scene ground truth vs regions ------------------------------------------------------------------------

def test_objects_and_regions_agree(world):
    for split, image_id, image in _all_images(world):
        scene = split.scenes[image_id]
        assert SMALL.min_objects <= len(scene.objects) <= SMALL.max_objects
        assert scene.region_object.shape == (image.features.shape[0],)
        assert set(np.unique(scene.region_object)) <= set(range(-1, len(scene.objects)))
        for j, obj in enumerate(scene.objects):
            assert obj.name in CLASS_NAMES[: SMALL.num_classes] and obj.colour in COLOURS[: SMALL.num_colours]
            assert obj.size in SIZES
            row = _tight_region(split, image_id, j)
            np.testing.assert_allclose(image.norm_bb[row, :4].astype(np.float64), obj.box, atol=1e-3)
            # every region of the object is detected as the object's class
            for r in np.flatnonzero(scene.region_object == j):
                assert int(np.argmax(image.soft_labels[r, 1:])) + 1 == obj.label_id
        clutter = scene.region_object < 0
        if clutter.any() and (~clutter).any():   # objects are detected more confidently than clutter
            assert image.conf[~clutter].min() > image.conf[clutter].max()


def test_sizes_are_visible_in_boxes(world):
    areas = {"small": [], "large": []}
    for split in world.values():
        for scene in split.scenes.values():
            for obj in scene.objects:
                x1, y1, x2, y2 = obj.box
                areas[obj.size].append((x2 - x1) * (y2 - y1))
    assert max(areas["small"]) < min(areas["large"])


def test_class_label_ids_are_distinct_and_in_range(world):
    label_of: dict[str, int] = {}
    for split in world.values():
        for scene in split.scenes.values():
            for obj in scene.objects:
                assert label_of.setdefault(obj.name, obj.label_id) == obj.label_id
    assert len(set(label_of.values())) == len(label_of)
    assert all(1 <= label < SMALL.num_labels for label in label_of.values())
    for split in world.values():
        for name, label in label_of.items():
            assert split.label_names[label] == name


# ---- splits and captions ----------------------------------------------------------------------------------

def test_splits_are_disjoint_and_captions_belong_to_their_split(world):
    train, val = world["train"], world["val"]
    assert len(train.images) == SMALL.num_train_images and len(val.images) == SMALL.num_val_images
    assert not set(train.images) & set(val.images)
    # no leak: continuous boxes and features never repeat between independent draws
    train_scenes = {scene.objects for scene in train.scenes.values()}
    assert not any(scene.objects in train_scenes for scene in val.scenes.values())
    train_features = {image.features.tobytes() for image in train.images.values()}
    assert not any(image.features.tobytes() in train_features for image in val.images.values())
    text_ids = [c.text_id for split in world.values() for c in split.captions]
    assert len(text_ids) == len(set(text_ids))
    for split in world.values():
        assert {c.image_id for c in split.captions} == set(split.images)
        assert all(len(ids) == SMALL.captions_per_image for ids in split.img2txts.values())
        for c in split.captions:
            assert split.txt2img[c.text_id] == c.image_id and c.text_id in split.img2txts[c.image_id]


_DET = "|".join(["a", "an", *NUMBER_WORDS])
_NP = re.compile(rf"\b({_DET}) (?:(small|large) )?(?:({'|'.join(COLOURS)}) )?([a-z]+)\b")
_RELATION = re.compile(r"to the left of|to the right of|above|below|next to")
_POSITION = re.compile(r"on the left|on the right|at the top|at the bottom|in the middle")


def _class_of(word: str) -> tuple[str, bool] | None:
    """(class name, plural?) of a noun, by the test's own English rules."""
    for name in CLASS_NAMES:
        if word == name:
            return name, False
        if word in (name + "s", name + "es"):
            return name, True
    return None


def _noun_phrases(text: str) -> list[tuple[re.Match, str, bool]]:
    found = []
    for m in _NP.finditer(text.lower()):
        cls = _class_of(m.group(4))
        if cls is not None:
            found.append((m, *cls))
    return found


def _referents(scene, m: re.Match, name: str, plural: bool) -> list[int]:
    """Indices of the scene objects a noun phrase can mean; asserts what the phrase claims."""
    det, size, colour = m.group(1), m.group(2), m.group(3)
    of_class = [j for j, o in enumerate(scene.objects) if o.name == name]
    if plural:   # 'two red dogs': exactly two dogs, all red
        assert det in NUMBER_WORDS and NUMBER_WORDS[det] == len(of_class) >= 2, m.group(0)
        assert colour is None or all(scene.objects[j].colour == colour for j in of_class), m.group(0)
        return of_class
    assert det in ("a", "an"), m.group(0)
    assert (det == "an") == (m.group(0).split()[1][0] in "aeiou"), m.group(0)
    matching = [j for j in of_class if (size is None or scene.objects[j].size == size)
                and (colour is None or scene.objects[j].colour == colour)]
    assert matching, f"{m.group(0)!r} matches no object"
    return matching


def _relation_holds(rel: str, a, b) -> bool:
    """The module's documented rule: centres 0.1 apart for left/right/above/below, closer than 0.35 for next to."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)   # y grows downwards, as in image boxes
    return {"to the left of": ax < bx - 0.1, "to the right of": ax > bx + 0.1, "above": ay < by - 0.1,
            "below": ay > by + 0.1, "next to": np.hypot(ax - bx, ay - by) < 0.35}[rel]


def _position_holds(pos: str, box) -> bool:
    """The documented thirds: left/top below 0.4, right/bottom above 0.6, middle within 0.15 of the centre."""
    x, y = _centre(box)
    return {"on the left": x < 0.4, "on the right": x > 0.6, "at the top": y < 0.4, "at the bottom": y > 0.6,
            "in the middle": abs(x - 0.5) < 0.15 and abs(y - 0.5) < 0.15}[pos]


def test_captions_only_state_true_facts(world):
    seen = {"relation": 0, "position": 0, "count": 0}
    for split in world.values():
        for caption in split.captions:
            scene, image = split.scenes[caption.image_id], split.images[caption.image_id]
            text = caption.text
            assert text[0].isupper() and text.endswith("."), text
            phrases = _noun_phrases(text)
            class_words = [w for w in re.findall(r"[a-z]+", text.lower()) if _class_of(w)]
            assert phrases and len(phrases) == len(class_words), f"unparsed object words in {text!r}"
            referents = [_referents(scene, m, name, plural) for m, name, plural in phrases]
            seen["count"] += any(plural for _, _, plural in phrases)
            box = {j: image.norm_bb[_tight_region(split, caption.image_id, j)] for j in range(len(scene.objects))}

            for rel in _RELATION.finditer(text.lower()):
                left = max(i for i, (m, _, _) in enumerate(phrases) if m.end() <= rel.start())
                right = min(i for i, (m, _, _) in enumerate(phrases) if m.start() >= rel.end())
                assert any(a != b and _relation_holds(rel.group(0), box[a], box[b])
                           for a in referents[left] for b in referents[right]), text
                seen["relation"] += 1
            for pos in _POSITION.finditer(text.lower()):
                assert len(phrases) == 1, text
                assert any(_position_holds(pos.group(0), box[j]) for j in referents[0]), text
                seen["position"] += 1
    assert all(count > 10 for count in seen.values()), seen


def test_captions_are_varied(world):
    captions = [c for split in world.values() for c in split.captions]
    texts = [c.text for c in captions]
    assert len(set(texts)) > 0.8 * len(texts)
    words = set(re.findall(r"[a-z]+", " ".join(texts).lower()))
    assert set(COLOURS[: SMALL.num_colours]) <= words and set(SIZES) <= words
    assert {"left", "right", "above", "below", "next", "top", "bottom", "middle", "two"} <= words
    openings = {" ".join(t.split()[:2]) for t in texts}
    assert len(openings) >= 8
    for split in world.values():   # several different captions for one image
        for ids in list(split.img2txts.values())[:20]:
            assert len({next(c.text for c in split.captions if c.text_id == i) for i in ids}) >= 2


# ---- the signal is learnable ------------------------------------------------------------------------------

def _object_regions(split: WorldSplit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, class names and colours of every object's tight region."""
    feats, names, colours = [], [], []
    for image_id, image in split.images.items():
        for j, obj in enumerate(split.scenes[image_id].objects):
            feats.append(image.features[_tight_region(split, image_id, j)].astype(np.float32))
            names.append(obj.name)
            colours.append(obj.colour)
    return np.stack(feats), np.array(names), np.array(colours)


def _nearest_mean(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    labels = np.unique(train_y)
    means = np.stack([train_x[train_y == label].mean(axis=0) for label in labels])
    dist = (test_x ** 2).sum(1)[:, None] - 2 * test_x @ means.T + (means ** 2).sum(1)[None]
    return labels[dist.argmin(axis=1)]


def test_class_and_colour_are_predictable_from_features(world):
    x, names, colours = _object_regions(world["train"])
    vx, vnames, vcolours = _object_regions(world["val"])
    class_acc = (_nearest_mean(x, names, vx) == vnames).mean()
    colour_acc = (_nearest_mean(x, colours, vx) == vcolours).mean()
    assert class_acc > 0.8, class_acc     # chance is 1 / num_classes = 0.05
    assert colour_acc > 0.5, colour_acc   # chance is 1 / num_colours = 0.125


def test_noise_free_regions_of_one_kind_share_features():
    world = make_world(dataclasses.replace(SMALL, feature_noise=0.0, num_train_images=120, num_val_images=1))
    x, names, colours = _object_regions(world["train"])
    sizes = np.array([o.size for s in world["train"].scenes.values() for o in s.objects])
    kinds = list(zip(names, colours, sizes))
    first = {}
    for i, kind in enumerate(kinds):
        j = first.setdefault(kind, i)
        assert np.array_equal(x[i], x[j]), kind
    assert len({x[i].tobytes() for i in first.values()}) == len(first)


def test_caption_fits_its_own_image_better_than_another(world):
    """What ITM and retrieval need: regions classified from features agree with their own caption."""
    x, names, _ = _object_regions(world["train"])
    val = world["val"]
    predicted = {image_id: set(_nearest_mean(x, names, image.features.astype(np.float32)[
        val.scenes[image_id].region_object >= 0])) for image_id, image in val.images.items()}
    image_ids = list(val.images)
    rng = np.random.default_rng(0)
    wins = []
    for caption in val.captions:
        mentioned = {name for _, name, _ in _noun_phrases(caption.text)}
        other = image_ids[(image_ids.index(caption.image_id) + rng.integers(1, len(image_ids))) % len(image_ids)]
        wins.append(len(mentioned & predicted[caption.image_id]) > len(mentioned & predicted[other]))
    assert np.mean(wins) > 0.75, np.mean(wins)


# ---- config -----------------------------------------------------------------------------------------------

def test_default_config_is_a_demo_sized_world():
    config = WorldConfig()
    assert 1000 <= config.num_train_images <= 2000 and 100 <= config.num_val_images <= 300
    assert (config.min_regions, config.max_regions) == (10, 24)
    assert (config.img_dim, config.num_labels) == (2048, 1601)
    world = make_world(config)
    assert len(world["train"].images) == config.num_train_images
    counts = [image.features.shape[0] for split in world.values() for image in split.images.values()]
    assert min(counts) >= 10 and max(counts) <= 24 and len(set(counts)) > 5
    image = next(iter(world["val"].images.values()))
    assert image.features.shape[1] == 2048 and image.soft_labels.shape[1] == 1601


@pytest.mark.parametrize("field, value", [
    ("seed", -1), ("seed", 1.5), ("num_train_images", 0), ("num_val_images", 0), ("captions_per_image", 0),
    ("min_objects", 0), ("max_objects", 0), ("max_objects", 99), ("min_regions", 2), ("max_regions", 5),
    ("num_classes", 1), ("num_classes", 999), ("num_colours", 0), ("num_colours", 999), ("feature_noise", -0.5),
    ("img_dim", 0), ("num_labels", 5), ("num_train_images", True),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"WorldConfig\.{field}\b"):
        WorldConfig(**{field: value})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        WorldConfig().seed = 1
