"""CE-FAM evaluation readers on tiny trees written here in the exact public formats (Broden, ImageNet-S), and the
testbed reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastcbm.cefam import datasets as D
from fastcbm.data import synthetic as S

pytestmark = pytest.mark.usefixtures("one_thread")


def _label_png(path, labels: np.ndarray) -> None:
    """Write labels as the datasets do: R = id % 256, G = id // 256, B = 0."""
    labels = labels.astype(np.int64)
    rgb = np.stack([labels % 256, labels // 256, np.zeros_like(labels)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def _jpg(path, h: int, w: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


LABEL_CSV = (
    "number,name,category,frequency,coverage,syns\n"
    "1,black-c,color(33),33,1.0,\n"
    "2,wall,object(20);part(2),22,5.0,\n"
    "3,fabric,material(36);object(3),39,4.2,cloth\n"
    "4,street-s,scene(5),5,0.0,\n"
    "5,pool_table,object(2),2,1.0,\n"
)
# label numbers above 255 exercise the G·256 + R decoding
LABEL_CSV += "".join(f"{i},lab{i},part(1),1,1.0,\n" for i in range(6, 301))


def _broden(tmp_path):
    root = tmp_path / "broden"
    for s in D.BRODEN_SOURCES:
        (root / "images" / s).mkdir(parents=True)
    (root / "label.csv").write_text(LABEL_CSV)
    # ade20k: 224 image, 112 masks (Broden's half-resolution segmentations), object + part file
    _jpg(root / "images/ade20k/ADE_train_00000001.jpg", 224, 224)
    obj = np.zeros((112, 112), np.int64)
    obj[:56] = 2
    obj[56:, :30] = 5
    _label_png(root / "images/ade20k/ADE_train_00000001_object.png", obj)
    part = np.zeros((112, 112), np.int64)
    part[10:20, 10:20] = 300  # 300 = G 1, R 44
    _label_png(root / "images/ade20k/ADE_train_00000001_part_1.png", part)
    # opensurfaces: material; pascal: colour
    _jpg(root / "images/opensurfaces/100001.jpg", 64, 96, 1)
    mat = np.zeros((32, 48), np.int64)
    mat[:, :24] = 3
    _label_png(root / "images/opensurfaces/100001_material.png", mat)
    _jpg(root / "images/pascal/2008_000002.jpg", 80, 80, 2)
    col = np.ones((40, 40), np.int64)
    _label_png(root / "images/pascal/2008_000002_color.png", col)
    return root


def test_broden_reader(tmp_path):
    root = _broden(tmp_path)
    labels = D.read_broden_labels(root)
    assert labels[1] == ("black", "color")  # "-c" dropped
    assert labels[3] == ("fabric", "material")  # first category
    assert labels[4] == ("street", "scene")
    assert labels[5] == ("pool table", "object")
    ds = D.BrodenDataset(root)
    assert len(ds) == 4 and len(ds.concepts) == 300 and ds.concepts[1] == "wall" and ds.types[2] == "material"
    recs = list(ds)
    got = [(r.key, r.concept, r.concept_type, int(r.mask.sum()), tuple(r.image.shape)) for r in recs]
    assert got == [
        ("ade20k/ADE_train_00000001_object.png", "wall", "object", 56 * 112, (3, 224, 224)),
        ("ade20k/ADE_train_00000001_object.png", "pool table", "object", 56 * 30, (3, 224, 224)),
        ("ade20k/ADE_train_00000001_part_1.png", "lab300", "part", 100, (3, 224, 224)),
        ("opensurfaces/100001_material.png", "fabric", "material", 32 * 24, (3, 64, 96)),
        ("pascal/2008_000002_color.png", "black", "color", 1600, (3, 80, 80)),
    ]
    assert recs[0].mask.dtype == torch.bool and recs[0].mask.shape == (112, 112)
    assert recs[0].image is recs[1].image  # one decoded image per mask file
    assert recs[0].mask[:56].all() and not recs[0].mask[56:].any()
    # list twice: re-iterable
    assert len(list(ds)) == 5


def test_broden_uint16_decoding(tmp_path):
    """Label 300 is G=1, R=44: uint8 arithmetic would give (1*256 + 44) % 256 = 44."""
    p = tmp_path / "m.png"
    _label_png(p, np.full((4, 4), 300))
    assert D.decode_label_png(p).dtype == np.uint16
    assert (D.decode_label_png(p) == 300).all()


def test_broden_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not a Broden layout"):
        D.BrodenDataset(tmp_path)
    root = _broden(tmp_path)
    _label_png(root / "images/pascal/2008_000002_part_1.png", np.ones((30, 40), np.int64))
    with pytest.raises(ValueError, match=r"mask is 30x40 but its image is 80x80"):
        list(D.BrodenDataset(root))
    (root / "images/pascal/2008_000002_part_1.png").unlink()
    _label_png(root / "images/pascal/2008_000002_part_1.png", np.full((40, 40), 999))
    with pytest.raises(ValueError, match="label 999 is not in"):
        list(D.BrodenDataset(root))
    with pytest.raises(ValueError, match="--data must be one of"):
        D.open_dataset("coco", root)


def _imagenet_s(tmp_path):
    root = tmp_path / "ins"
    for w in ("n01443537", "n01530575"):
        (root / "validation" / w).mkdir(parents=True)
        (root / "validation-segmentation" / w).mkdir(parents=True)
    _jpg(root / "validation/n01443537/ILSVRC2012_val_00000001.JPEG", 40, 50)
    m = np.zeros((40, 50), np.int64)
    m[:20] = 2
    m[30:] = 1000  # ignore region
    _label_png(root / "validation-segmentation/n01443537/ILSVRC2012_val_00000001.png", m)
    _jpg(root / "validation/n01530575/ILSVRC2012_val_00000002.JPEG", 30, 30)
    m2 = np.zeros((30, 30), np.int64)
    m2[5:10, 5:10] = 12
    _label_png(root / "validation-segmentation/n01530575/ILSVRC2012_val_00000002.png", m2)
    return root


def test_imagenet_s_reader_ignore_id(tmp_path):
    root = _imagenet_s(tmp_path)
    (root / "names.json").write_text('{"n01443537": "goldfish", "n01530575": ["brambling"]}')
    ds = D.ImageNetSDataset(root, class_names=root / "names.json")
    recs = list(ds)
    assert [(r.concept, r.concept_type, int(r.mask.sum())) for r in recs] == [("goldfish", "object", 1000),
                                                                             ("brambling", "object", 25)]
    assert ds.concepts == ["goldfish", "brambling"]
    # the authors' bug, as a flag: the largest id present is the ignore region
    recs = list(D.ImageNetSDataset(root, authors_target=True))
    assert recs[0].concept == "n01443537" and int(recs[0].mask.sum()) == 500
    # a names list file
    (root / "val.txt").write_text("n01530575/ILSVRC2012_val_00000002.JPEG n01530575/ILSVRC2012_val_00000002.png\n")
    assert len(list(D.ImageNetSDataset(root, names=root / "val.txt"))) == 1


def test_imagenet_s_bad_layout(tmp_path):
    with pytest.raises(ValueError, match="not an ImageNet-S layout"):
        D.ImageNetSDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="root"):
        D.open_dataset("imagenet-s", tmp_path / "missing")


def test_testbed_reader():
    ds = D.TestbedDataset(5, chunk=3)
    recs = list(ds)
    assert {r.key for r in recs} == {f"scene{i}" for i in range(5)}
    assert set(ds.types) == set(D.CONCEPT_TYPES)
    ref = S.generate(3, ds.seed)
    first = [r for r in recs if r.key == "scene0"]
    masks = ref.scene_concept_masks(0)
    names = S.concept_names()
    assert {r.concept for r in first} == {names[k] for k in torch.nonzero(ref.concepts_present[0]).flatten().tolist()}
    for r in first:
        assert torch.equal(r.mask, masks[names.index(r.concept)]) and r.mask.any()
        assert torch.equal(r.image, ref.images[0])
    with pytest.raises(ValueError, match="seeds must be >="):
        D.TestbedDataset(5, seed=3)


def test_concept_texts():
    assert D.concept_texts(["red", "glass"], ["color", "material"], D.BRODEN_TEMPLATES) == [
        "a photo of a red object", "a photo of an object made of glass"]
