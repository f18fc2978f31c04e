"""Contrastive training of the testbed CLIP on captioned synthetic scenes, with red-ring prompts.

Each step draws 128 scenes from a fixed pool of training scenes (seeds 10,000+, far below the evaluation seeds) and
captions them at random: 40 % get a red ring around one object and a caption naming only that object ("a blue
striped square in a red ring", "striped in a red ring", or the bare concept word "striped"), 15 % a ring at a SALF grid
position captioned with the object under its centre (or the background), 20 % an attribute caption in the zero-shot
templates ("a photo of a {shape}", "a photo of a {colour} object", ...), the rest a caption of the whole scene. The loss
is CLIP's symmetric InfoNCE with identical captions counted as positives. An optional attribute term
(``attribute_weight``) adds hard negatives in the spirit of NegCLIP: every single-object image is also scored against the
template captions of all values of its shape, colour and texture ("a photo of a striped object" against "... checkered
object" and "... solid object"), which contrastive batches of random captions rarely pit against each other, and
(``ring_attributes``) every ring-prompted image against the bare words of all values of its ringed object's attributes.
Single-threaded and seeded: reruns give the same weights. (The ring is called a "ring" in captions so that the shape
word "circle" keeps one meaning.)
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from fastcbm.data import synthetic as S
from fastcbm.models import testbed as T
from fastcbm.testbed.evaluate import ATTRIBUTE_VALUES, ZERO_SHOT_TEMPLATES

POOL_SCENES = 16384
POOL_CHUNK = 1024
POOL_SEED = 10_000


def make_pool(n: int = POOL_SCENES) -> list[S.SceneBatch]:
    return [S.generate(POOL_CHUNK, seed=POOL_SEED + k // POOL_CHUNK) for k in range(0, n, POOL_CHUNK)]


def _phrase(obj: S.SceneObject, rng: random.Random) -> str:
    if rng.random() < 0.2:
        return obj.phrase()
    shape, color, texture, parts = (rng.random() < 0.5, rng.random() < 0.6, rng.random() < 0.5, rng.random() < 0.3)
    if not (shape or color or texture or parts):
        shape = True
    return obj.phrase(shape=shape, color=color, texture=texture, parts=parts)


def _single_concept(obj: S.SceneObject, rng: random.Random) -> str:
    return rng.choice([obj.shape, obj.color, obj.texture, *obj.parts])


def _ringed_caption(obj: S.SceneObject, rng: random.Random) -> str:
    u = rng.random()
    if u < 0.15:
        return _single_concept(obj, rng)  # bare concept words are what SALF-CBM compares ring prompts with
    text = _single_concept(obj, rng) if u < 0.4 else "a " + _phrase(obj, rng)
    return text + " in a red ring"


def _attribute_caption(obj: S.SceneObject, rng: random.Random) -> str:
    options = [template.format(getattr(obj, attr)) for attr, template in ZERO_SHOT_TEMPLATES.items()]
    options += [f"a photo of something with a {part}" for part in obj.parts]
    return rng.choice(options)


def attribute_loss(model: torch.nn.Module, tokenizer, img_emb: torch.Tensor, objects: list[list[S.SceneObject]],
                   scale: torch.Tensor, ringed: list[S.SceneObject | None] | None = None) -> torch.Tensor:
    """Hard-negative attribute cross-entropy over ``img_emb [B, D]`` (unit rows).

    Global term: single-object images against the template captions of every value of each attribute ("a photo of a
    striped object" vs "... checkered ..." vs "... solid ..."). Local term (with ``ringed``, the object inside each
    image's ring or None): ring-prompted images against the bare words of every value ("striped" vs "checkered" vs
    "solid") — the texts SALF-CBM compares ring prompts with, so the local semantics it relies on are trained with the
    same hard negatives. Mean over the terms present; 0 when there is nothing to score."""
    groups = [([i for i, objs in enumerate(objects) if len(objs) == 1], lambda i: objects[i][0], True)]
    if ringed is not None:
        groups.append(([i for i, obj in enumerate(ringed) if obj is not None], lambda i: ringed[i], False))
    loss, terms = img_emb.new_zeros(()), 0
    for rows, obj_of, templated in groups:
        if not rows:
            continue
        img = img_emb[rows]
        for attr, values in ATTRIBUTE_VALUES.items():
            texts = [ZERO_SHOT_TEMPLATES[attr].format(v) if templated else v for v in values]
            txt = model.encode_text(tokenizer(texts), normalize=True)
            truth = torch.tensor([values.index(getattr(obj_of(i), attr)) for i in rows])
            loss = loss + torch.nn.functional.cross_entropy(scale * img @ txt.T, truth)
            terms += 1
    return loss / terms if terms else img_emb.sum() * 0


def make_batch(pool: list[S.SceneBatch], size: int, rng: random.Random, objects_out: list | None = None,
               ringed_out: list | None = None) -> tuple[torch.Tensor, list[str]]:
    """uint8 images ``[size, 3, 64, 64]`` (some with a red ring) and their captions; ``objects_out`` (optional) receives
    each image's scene objects, ``ringed_out`` the object inside its ring (None: no ring, or a ring on background)."""
    grid_centers, grid_radius, ring_width = S.salf_ring_geometry()
    src = pool[rng.randrange(len(pool))]
    ids = rng.sample(range(len(src)), size)
    images = src.images[ids].clone()
    masks = src.object_masks[ids]
    captions, ringed, centers, radii = [], [], [], []
    for i, k in enumerate(ids):
        objs, background = src.objects[k], src.backgrounds[k]
        if objects_out is not None:
            objects_out.append(objs)
        inside = None
        u = rng.random()
        if u < 0.40:  # ring around one object
            obj = objs[rng.randrange(len(objs))]
            ringed.append(i)
            centers.append(obj.center)
            radii.append(obj.radius + rng.uniform(1.5, 4.0))
            captions.append(_ringed_caption(obj, rng))
            inside = obj
        elif u < 0.55:  # ring at a SALF grid position
            g = rng.randrange(grid_centers.shape[0])
            cx, cy = grid_centers[g].tolist()
            ringed.append(i)
            centers.append((cx, cy))
            radii.append(grid_radius)
            x, y = int(round(cx)), int(round(cy))
            hit = None
            for j, obj in enumerate(objs):
                if masks[i, j, y, x]:
                    hit = obj
            captions.append(f"{background} background in a red ring" if hit is None else _ringed_caption(hit, rng))
            inside = hit
        elif u < 0.75:  # zero-shot templates
            captions.append(_attribute_caption(objs[rng.randrange(len(objs))], rng))
        elif rng.random() < 0.4 or len(objs) == 1:
            if rng.random() < 0.5 or len(objs) != 1:
                captions.append(S.scene_caption(objs, background))
            else:
                captions.append("a photo of a " + _phrase(rng.choice(objs), rng))
        else:
            captions.append("a photo of " + " and ".join("a " + _phrase(o, rng) for o in objs))
        if ringed_out is not None:
            ringed_out.append(inside)
    if ringed:
        idx = torch.tensor(ringed)
        images[idx] = S.draw_ring(images[idx], torch.tensor(centers, dtype=torch.float32), torch.tensor(radii),
                                  ring_width)
    return images, captions


def train_clip(out: str | Path, steps: int = 2500, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
               init: str | Path | None = None, attribute_weight: float = 0.0, ring_attributes: bool = False,
               log_every: int = 25,
               checkpoint_every: int = 250, progress: bool = True) -> dict:
    """Train the testbed CLIP; writes ``out/testbed_clip.safetensors`` and returns the evaluation scores.

    ``init``: continue from these weights (a fine-tuning stage; use a new ``seed`` so it sees new batches).
    ``attribute_weight``: weight of the attribute hard-negative term (:func:`attribute_loss`; 0 = plain CLIP loss);
    ``ring_attributes``: include its local (ring-prompt) part."""
    from tqdm.auto import tqdm

    from fastcbm.testbed.evaluate import evaluate_clip

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # small matmuls: one thread is faster than two oversubscribed ones, and deterministic
    pool = make_pool()
    torch.manual_seed(seed)
    model = T.make_clip()
    if init is not None:
        T.load_weights(model, "clip", init)
    model.train()
    opt = torch.optim.AdamW(list(model.parameters()), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    rng = random.Random(seed)
    tokenizer = T.WordTokenizer()
    t0 = time.time()
    bar = tqdm(range(steps), desc="testbed CLIP", disable=not progress)
    for step in bar:
        for group in opt.param_groups:  # warm-up then cosine decay
            group["lr"] = lr * min(1, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        objects: list = []
        inside: list = []
        images, captions = make_batch(pool, batch_size, rng, objects, inside)
        img_emb, txt_emb, scale = model(T.normalize(images), tokenizer(captions))
        logits = scale * img_emb @ txt_emb.T
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
        if attribute_weight:
            loss = loss + attribute_weight * attribute_loss(model, tokenizer, img_emb, objects, scale,
                                                            inside if ring_attributes else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if checkpoint_every and step and step % checkpoint_every == 0:  # to watch a long run; overwritten at the end
            T.save_weights(model, out / T.WEIGHTS["clip"])
    model.eval()
    T.save_weights(model, out / T.WEIGHTS["clip"])
    scores = evaluate_clip(T.load_weights(T.make_clip(), "clip", out / T.WEIGHTS["clip"]))  # as shipped (fp16)
    scores["train_seconds"] = round(time.time() - t0, 1)
    return scores
