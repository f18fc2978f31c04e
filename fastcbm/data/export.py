"""ImageFolder export of synthetic testbed scenes, so the real-data code paths (folder loading, precompute, CLI) run
on them, and the reader that loads an export back.

Layout::

    root/images/<class>/<index>.png      RGB scenes, one folder per class (torchvision ImageFolder layout)
    root/masks/<index>.npz               one bool [S, S] array per concept present, keyed by concept name
    root/labels.csv                      file,label,class
    root/concepts.json                   {"concepts": [{"name", "type"}], "classes": [...], "rules": [...]}
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch

from fastcbm.data import synthetic
from fastcbm.errors import InvalidFile, MissingFile


def _class_dir(name: str) -> str:
    return name.replace(" ", "_")


def scene_index(path: str | os.PathLike) -> int:
    """The scene index encoded in an exported image's file name (``.../<index>.png``)."""
    stem = Path(path).stem
    if not stem.isdigit():
        raise InvalidFile(f"{path} is not an exported testbed image (expected <index>.png)")
    return int(stem)


def export_image_folder(batch: synthetic.SceneBatch, root: str | os.PathLike, *, masks: bool = True) -> Path:
    """Write ``batch`` under ``root`` (layout above) and return the images folder ``root/images``."""
    from PIL import Image

    root = Path(root)
    names = synthetic.class_names()
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / "images" / _class_dir(name)).mkdir(exist_ok=True)
    if masks:
        (root / "masks").mkdir(exist_ok=True)
    concept_list = synthetic.concept_names()
    rows = []
    width = max(6, len(str(len(batch))))
    for i in range(len(batch)):
        label = int(batch.labels[i])
        rel = Path("images") / _class_dir(names[label]) / f"{i:0{width}d}.png"
        Image.fromarray(batch.images[i].permute(1, 2, 0).numpy()).save(root / rel)
        rows.append((rel.as_posix(), label, names[label]))
        if masks:
            cm = batch.scene_concept_masks(i)
            present = {concept_list[k]: cm[k].numpy() for k in range(cm.shape[0]) if bool(cm[k].any())}
            np.savez_compressed(root / "masks" / f"{i:0{width}d}.npz", **present)
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "class"])
        writer.writerows(rows)
    meta = {"concepts": [{"name": n, "type": t} for n, t in synthetic.vocabulary()], "classes": names,
            "rules": synthetic.class_rules(), "image_size": int(batch.images.shape[-1]), "seed": batch.seed}
    (root / "concepts.json").write_text(json.dumps(meta, indent=2))
    (root / "concepts.txt").write_text("\n".join(synthetic.concept_names()) + "\n")
    return root / "images"


def read_image_folder(root: str | os.PathLike, *, masks: bool = False) -> dict:
    """Read an export back: ``images`` uint8 [N, 3, S, S], ``labels`` long [N], ``classes``, ``files``, and with
    ``masks=True`` ``concept_masks`` bool [N, K, S, S] over ``concepts`` (the vocabulary order)."""
    from PIL import Image

    root = Path(root)
    labels_file = root / "labels.csv"
    if not labels_file.is_file():
        raise MissingFile(f"{labels_file} not found: {root} is not a fastcbm testbed export")
    meta = json.loads((root / "concepts.json").read_text())
    with open(labels_file, newline="") as f:
        rows = list(csv.DictReader(f))
    images, labels, files = [], [], []
    for row in rows:
        with Image.open(root / row["file"]) as img:
            images.append(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1))
        labels.append(int(row["label"]))
        files.append(str(root / row["file"]))
    out = {"images": torch.stack(images) if images else torch.zeros(0, 3, 0, 0, dtype=torch.uint8),
           "labels": torch.tensor(labels, dtype=torch.long), "classes": meta["classes"], "files": files,
           "concepts": [c["name"] for c in meta["concepts"]]}
    if masks:
        names = out["concepts"]
        size = out["images"].shape[-1]
        cm = torch.zeros(len(rows), len(names), size, size, dtype=torch.bool)
        for i, path in enumerate(files):
            with np.load(root / "masks" / f"{Path(path).stem}.npz") as z:
                for key in z.files:
                    cm[i, names.index(key)] = torch.from_numpy(z[key])
        out["concept_masks"] = cm
    return out
