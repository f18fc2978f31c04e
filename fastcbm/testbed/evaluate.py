"""Quality of the testbed models on fresh scenes (seeds at or above ``TRAINING_SEED_LIMIT``, never used in training).

- CLIP zero-shot on single-object scenes: top-1 among all values of shape / colour / texture.
- Red-ring sensitivity: two-object scenes, a ring around one; share of scenes where the ringed object's caption
  outscores the other object's caption (scenes whose two captions are identical are left out).
- Classifier accuracy on the rule task.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from fastcbm.data import synthetic as S
from fastcbm.models import testbed as T

EVAL_SEED = S.TRAINING_SEED_LIMIT + 777
# the zero-shot prompts; the CLIP's training (fastcbm.testbed.train_clip) captions and hard negatives use the same
ZERO_SHOT_TEMPLATES = {"shape": "a photo of a {}", "color": "a photo of a {} object",
                       "texture": "a photo of a {} object"}
ATTRIBUTE_VALUES = {"shape": S.SHAPES, "color": tuple(S.COLORS), "texture": S.TEXTURES}


@torch.no_grad()
def evaluate_clip(model: nn.Module, n: int = 300, seed: int = EVAL_SEED) -> dict[str, float]:
    model.eval()
    tokenizer = T.WordTokenizer()
    scenes = S.generate(n, seed=seed, num_objects=1)
    img = model.encode_image(T.normalize(scenes.images), normalize=True)
    scores: dict[str, float] = {}
    for attr, values in ATTRIBUTE_VALUES.items():
        txt = model.encode_text(tokenizer([ZERO_SHOT_TEMPLATES[attr].format(v) for v in values]), normalize=True)
        pred = (img @ txt.T).argmax(1)
        truth = torch.tensor([list(values).index(getattr(objs[0], attr)) for objs in scenes.objects])
        scores[f"zero_shot_{attr}"] = float((pred == truth).float().mean())
    pairs = S.generate(n, seed=seed + 1, num_objects=2)
    rng = random.Random(seed)
    inside, outside, centers, radii = [], [], [], []
    for objs in pairs.objects:
        j = rng.randrange(2)
        ringed, other = objs[j], objs[1 - j]
        centers.append(ringed.center)
        radii.append(ringed.radius + 3.0)
        inside.append("a " + ringed.phrase() + " in a red ring")
        outside.append("a " + other.phrase() + " in a red ring")
    images = S.draw_ring(pairs.images, torch.tensor(centers, dtype=torch.float32), torch.tensor(radii), 2.0)
    img = model.encode_image(T.normalize(images), normalize=True)
    t_in = model.encode_text(tokenizer(inside), normalize=True)
    t_out = model.encode_text(tokenizer(outside), normalize=True)
    keep = torch.tensor([a != b for a, b in zip(inside, outside)])
    wins = ((img * t_in).sum(1) > (img * t_out).sum(1)).float()
    scores["ring_sensitivity"] = float(wins[keep].mean())
    return scores


@torch.no_grad()
def evaluate_classifier(model: nn.Module, n: int = 600, seed: int = S.TRAINING_SEED_LIMIT + 999) -> float:
    model.eval()
    scenes = S.generate(n, seed=seed)
    return float((model(T.normalize(scenes.images)).argmax(1) == scenes.labels).float().mean())
