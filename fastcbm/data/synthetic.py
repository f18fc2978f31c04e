"""Deterministic synthetic scenes: the offline testbed that makes concept methods measurable.

Each 64×64 scene holds 1–3 non-overlapping objects on a plain, slightly noisy background. An object has a shape, a
colour, a texture and optional parts (a border and/or a centre dot). Every concept present gets a per-pixel mask, and
a rule-based task with 12 classes ("contains a blue circle", ...) is stated in those concepts, so a concept bottleneck
can explain it. Nothing is red: pure red (255, 0, 0) is reserved for the visual-prompt rings (:func:`draw_ring`).

Seeds: ``generate(n, seed)`` is a pure function of ``(n, seed)`` and the options. The bundled testbed models were
trained on seeds in ``[0, TRAINING_SEED_LIMIT)``; evaluate on seeds ``>= TRAINING_SEED_LIMIT`` for scenes the
training never saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastcbm.errors import InvalidArgument

TESTBED_IMAGE_SIZE = 64
TRAINING_SEED_LIMIT = 1_000_000  # training uses seeds below this; evaluation seeds start here
MAX_OBJECTS = 3
RADIUS_RANGE = (6.0, 12.0)  # object radii in pixels: a 9 px SALF ring (width 2) can surround one

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
# object colours: saturated, none of them red (the ring colour); jittered per object
COLORS: dict[str, tuple[int, int, int]] = {
    "blue": (45, 85, 230),
    "green": (40, 165, 60),
    "yellow": (235, 205, 45),
    "purple": (135, 65, 200),
    "cyan": (40, 200, 215),
    "white": (240, 240, 240),
}
TEXTURES: tuple[str, ...] = ("solid", "striped", "checkered")
PARTS: tuple[str, ...] = ("border", "dot")
# low-saturation, non-red backgrounds
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (120, 120, 120),
    "sand": (175, 160, 120),
    "slate": (80, 100, 120),
    "olive": (105, 110, 75),
}
PART_COLOR = (20, 20, 20)
RING_COLOR = (255, 0, 0)
_COLOR_NAMES = tuple(COLORS)
_BG_NAMES = tuple(BACKGROUNDS)

# The rule task: class k <=> the scene contains an object of shape s_k and colour c_k. Each shape takes two colours
# and each colour two shapes; distractor objects never form a class pair, so every scene has exactly one class.
_CLASS_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (shape, _COLOR_NAMES[(i + off) % len(_COLOR_NAMES)]) for i, shape in enumerate(SHAPES) for off in (0, 3)
)


def vocabulary() -> list[tuple[str, str]]:
    """All concepts as ``(name, type)``; type is one of Broden's groups "object", "part", "color", "material".

    Shapes are objects, textures materials, parts parts, colours colours; backgrounds ("grey background", ...) are
    scene regions and count as objects, as Broden's "sky"/"floor" do. The index in this list is the concept index K.
    """
    return ([(s, "object") for s in SHAPES] + [(p, "part") for p in PARTS] + [(c, "color") for c in COLORS]
            + [(t, "material") for t in TEXTURES] + [(f"{b} background", "object") for b in BACKGROUNDS])


def concept_names() -> list[str]:
    return [name for name, _ in vocabulary()]


def class_names() -> list[str]:
    """The 12 class names of the rule task, e.g. "blue circle"."""
    return [f"{c} {s}" for s, c in _CLASS_PAIRS]


def class_rules() -> list[str]:
    """Each class's rule in concept terms (index = class label)."""
    return [f"the scene contains an object that is both '{s}' and '{c}'" for s, c in _CLASS_PAIRS]


def class_concepts() -> list[tuple[str, str]]:
    """Each class's defining ``(shape, colour)`` concept pair."""
    return list(_CLASS_PAIRS)


_CONCEPT_INDEX = {name: i for i, name in enumerate(concept_names())}
_SHAPE_IDX = {s: i for i, s in enumerate(SHAPES)}
_COLOR_IDX = {c: i for i, c in enumerate(COLORS)}
_TEXTURE_IDX = {t: i for i, t in enumerate(TEXTURES)}
NUM_CONCEPTS = len(_CONCEPT_INDEX)


@dataclass
class SceneObject:
    """One object's attributes (for captions and ring placement); centre is (x, y) in pixels."""
    shape: str
    color: str
    texture: str
    parts: tuple[str, ...]
    center: tuple[float, float]
    radius: float

    def phrase(self, *, shape: bool = True, color: bool = True, texture: bool = True, parts: bool = True) -> str:
        """Noun phrase without article, e.g. "blue striped circle with a border and a dot"."""
        words = ([self.color] if color else []) + ([self.texture] if texture else [])
        words.append(self.shape if shape else "object")
        text = " ".join(words)
        if parts and self.parts:
            text += " with " + " and ".join(f"a {p}" for p in self.parts)
        return text


@dataclass
class SceneBatch:
    """A batch of generated scenes.

    images: uint8 ``[N, 3, S, S]``; labels: long ``[N]``; concepts_present: bool ``[N, K]``;
    object_masks: bool ``[N, MAX_OBJECTS, S, S]`` (empty slots all False); part_masks: bool
    ``[N, MAX_OBJECTS, len(PARTS), S, S]``; objects: per scene a list of :class:`SceneObject`; backgrounds: names.
    ``concept_masks`` (bool ``[N, K, S, S]``) is built on first access from the compact masks.
    """
    images: torch.Tensor
    labels: torch.Tensor
    concepts_present: torch.Tensor
    object_masks: torch.Tensor
    part_masks: torch.Tensor
    objects: list[list[SceneObject]]
    backgrounds: list[str]
    seed: int = 0
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def scene_concept_masks(self, i: int) -> torch.Tensor:
        """bool ``[K, S, S]`` for scene ``i``: pixels of every concept (zero planes for absent concepts)."""
        S = self.images.shape[-1]
        out = torch.zeros(NUM_CONCEPTS, S, S, dtype=torch.bool)
        for slot, obj in enumerate(self.objects[i]):
            m = self.object_masks[i, slot]
            for name in (obj.shape, obj.color, obj.texture):
                out[_CONCEPT_INDEX[name]] |= m
            for p_i, part in enumerate(PARTS):
                if part in obj.parts:
                    out[_CONCEPT_INDEX[part]] |= self.part_masks[i, slot, p_i]
        out[_CONCEPT_INDEX[f"{self.backgrounds[i]} background"]] = ~self.object_masks[i].any(0)
        return out

    @cached_property
    def concept_masks(self) -> torch.Tensor:
        """bool ``[N, K, S, S]`` (N·K·S² bytes: ~86 KB per scene; use :meth:`scene_concept_masks` for big N)."""
        n, S = len(self), self.images.shape[-1]
        out = torch.zeros(n, NUM_CONCEPTS, S, S, dtype=torch.bool)
        rows = torch.arange(n)
        for slot in range(MAX_OBJECTS):
            has = [slot < len(objs) for objs in self.objects]
            if not any(has):
                continue
            sel = rows[torch.tensor(has)]
            m = self.object_masks[sel, slot]
            for attr in ("shape", "color", "texture"):
                idx = torch.tensor([_CONCEPT_INDEX[getattr(self.objects[i][slot], attr)] for i in sel.tolist()])
                out[sel, idx] |= m
            for p_i, part in enumerate(PARTS):
                out[sel, _CONCEPT_INDEX[part]] |= self.part_masks[sel, slot, p_i]
        bg = torch.tensor([_CONCEPT_INDEX[f"{b} background"] for b in self.backgrounds], dtype=torch.long)
        out[rows, bg] = ~self.object_masks.any(1)
        return out

    def captions(self) -> list[str]:
        """Full captions, e.g. "a photo of a blue striped circle with a border on a grey background"."""
        return [scene_caption(objs, bg) for objs, bg in zip(self.objects, self.backgrounds)]


def scene_caption(objects: Sequence[SceneObject], background: str | None) -> str:
    text = "a photo of " + " and ".join(f"a {o.phrase()}" for o in objects)
    return text + (f" on a {background} background" if background else "")


def _sample_layout(rng: np.random.Generator, n_obj: int, size: int) -> list[tuple[float, float, float]]:
    """Non-overlapping (x, y, r) placements fully inside the image (rejection sampling, deterministic given rng)."""
    for _ in range(100):
        placed: list[tuple[float, float, float]] = []
        for _ in range(n_obj):
            for _ in range(50):
                r = float(rng.uniform(*RADIUS_RANGE))
                x, y = (float(v) for v in rng.uniform(r + 1, size - 2 - r, size=2))
                if all(math.hypot(x - px, y - py) > r + pr + 3 for px, py, pr in placed):
                    placed.append((x, y, r))
                    break
        if len(placed) == n_obj:
            return placed
    raise RuntimeError("could not place objects")  # pragma: no cover - radii are small enough that this never fires


def _shape_masks(shape_idx: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, size: int
                 ) -> torch.Tensor:
    """bool ``[M, S, S]``: the filled shape of each of M objects (vectorised over objects)."""
    ar = torch.arange(size, dtype=torch.float32)
    dx = ar.view(1, 1, -1) - cx.view(-1, 1, 1)
    dy = ar.view(1, -1, 1) - cy.view(-1, 1, 1)
    rr = r.view(-1, 1, 1)
    adx, ady = dx.abs(), dy.abs()
    rho = torch.sqrt(dx * dx + dy * dy)
    theta = torch.atan2(dy, dx)
    masks = torch.stack([
        rho <= rr,                                                        # circle
        torch.maximum(adx, ady) <= 0.82 * rr,                             # square
        (dy <= 0.7 * rr) & (dy >= -rr + 1.9 * adx),                       # triangle, apex up
        adx + ady <= 1.15 * rr,                                           # diamond
        ((adx <= 0.33 * rr) & (ady <= rr)) | ((ady <= 0.33 * rr) & (adx <= rr)),  # cross
        rho <= rr * (0.62 + 0.38 * torch.cos(5 * (theta + math.pi / 2))),  # five-pointed star, point up
    ])  # [6, M, S, S]
    return masks[shape_idx, torch.arange(shape_idx.numel())]


def generate(n: int, seed: int, *, size: int = TESTBED_IMAGE_SIZE, num_objects: int | tuple[int, int] = (1, 3),
             noise: float = 5.0) -> SceneBatch:
    """Generate ``n`` scenes deterministically from ``seed``.

    ``num_objects``: an exact count or an inclusive ``(min, max)`` range (1..3). Labels are balanced in expectation:
    the class is drawn uniformly, the scene gets one object of the class's (shape, colour) pair plus distractors that
    form no class pair. Returns a :class:`SceneBatch`.
    """
    if n < 0:
        raise InvalidArgument(f"n must be >= 0, got {n}")
    lo, hi = (num_objects, num_objects) if isinstance(num_objects, int) else tuple(num_objects)
    if not 1 <= lo <= hi <= MAX_OBJECTS:
        raise InvalidArgument(f"num_objects must be within 1..{MAX_OBJECTS}, got {num_objects!r}")
    if size < 32:
        raise InvalidArgument(f"size must be >= 32 (objects have radius up to {RADIUS_RANGE[1]}), got {size}")
    rng = np.random.default_rng(seed)
    class_set = set(_CLASS_PAIRS)
    distractors = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in class_set]

    labels = rng.integers(0, len(_CLASS_PAIRS), size=n)
    objects: list[list[SceneObject]] = []
    backgrounds: list[str] = []
    for i in range(n):
        k = int(rng.integers(lo, hi + 1))
        pairs = [_CLASS_PAIRS[labels[i]]] + [distractors[j] for j in rng.integers(0, len(distractors), size=k - 1)]
        order = rng.permutation(k)
        layout = _sample_layout(rng, k, size)
        objs = []
        for slot in range(k):
            s, c = pairs[order[slot]]
            texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
            has = rng.random(2) < 0.35
            parts = tuple(p for p, h in zip(PARTS, has) if h)
            x, y, r = layout[slot]
            objs.append(SceneObject(s, c, texture, parts, (x, y), r))
        objects.append(objs)
        backgrounds.append(_BG_NAMES[int(rng.integers(len(_BG_NAMES)))])

    # vectorised rendering over all objects (slot-major so we can composite slot by slot)
    M = n * MAX_OBJECTS
    attr_np = np.zeros((M, 4), dtype=np.int64)  # shape, colour, texture, parts bitmask
    geo_np = np.zeros((M, 3), dtype=np.float32)
    present_np = np.zeros(M, dtype=bool)
    for i, objs in enumerate(objects):
        for slot, o in enumerate(objs):
            j = i * MAX_OBJECTS + slot
            present_np[j] = True
            attr_np[j] = (_SHAPE_IDX[o.shape], _COLOR_IDX[o.color], _TEXTURE_IDX[o.texture],
                          sum(1 << PARTS.index(p) for p in o.parts))
            geo_np[j] = (o.center[0], o.center[1], o.radius)
    attr, geo, present = torch.from_numpy(attr_np), torch.from_numpy(geo_np), torch.from_numpy(present_np)
    color_jitter = torch.from_numpy(rng.integers(-15, 16, size=(M, 3))).float()
    bg_jitter = torch.from_numpy(rng.integers(-10, 11, size=(n, 3))).float()
    pix_noise = torch.from_numpy(rng.normal(0.0, noise, size=(n, 3, size, size)).astype(np.float32))
    phase = torch.from_numpy(rng.integers(0, 6, size=(M, 2)))

    # render only the objects that exist (empty slots would be a third to two thirds of the work), then scatter
    pi = torch.nonzero(present).flatten()
    a, g = attr[pi], geo[pi]
    m = _shape_masks(a[:, 0], g[:, 0], g[:, 1], g[:, 2], size) if pi.numel() else \
        torch.zeros(0, size, size, dtype=torch.bool)
    # border: the object minus its 2-pixel erosion (max-pool of the complement dilates the outside)
    eroded = ~(F.max_pool2d((~m).float().unsqueeze(1), 5, stride=1, padding=2).squeeze(1) > 0) if pi.numel() else m
    border_p = m & ~eroded & ((a[:, 3] & 1) > 0).view(-1, 1, 1)
    ar = torch.arange(size, dtype=torch.float32)
    ddx = ar.view(1, 1, -1) - g[:, 0].view(-1, 1, 1)
    ddy = ar.view(1, -1, 1) - g[:, 1].view(-1, 1, 1)
    dot_r = torch.clamp(0.28 * g[:, 2], min=1.6).view(-1, 1, 1)
    dot_p = m & (ddx * ddx + ddy * ddy <= dot_r * dot_r) & ((a[:, 3] & 2) > 0).view(-1, 1, 1)

    # textures on an integer grid anchored at a per-object phase: dark pattern pixels at 40 % brightness
    ph = phase[pi]
    xi = torch.arange(size).view(1, 1, -1) + ph[:, 0].view(-1, 1, 1)
    yi = torch.arange(size).view(1, -1, 1) + ph[:, 1].view(-1, 1, 1)
    striped = ((xi + yi) % 6) < 3
    checkered = ((xi // 3 + yi // 3) % 2) == 0
    tex = a[:, 2].view(-1, 1, 1)
    dark = ((tex == 1) & striped) | ((tex == 2) & checkered)
    palette = torch.tensor([COLORS[c] for c in _COLOR_NAMES], dtype=torch.float32)
    base = (palette[a[:, 1]] + color_jitter[pi]).clamp(0, 255).view(-1, 3, 1, 1)
    pix_p = base * torch.where(dark, 0.4, 1.0).unsqueeze(1)
    part_px = (border_p | dot_p).unsqueeze(1)
    pix_p = torch.where(part_px, torch.tensor(PART_COLOR, dtype=torch.float32).view(1, 3, 1, 1), pix_p)

    obj_mask = torch.zeros(M, size, size, dtype=torch.bool)
    border = torch.zeros_like(obj_mask)
    dot = torch.zeros_like(obj_mask)
    obj_pix = torch.zeros(M, 3, size, size)
    obj_mask[pi], border[pi], dot[pi], obj_pix[pi] = m, border_p, dot_p, pix_p

    bg_palette = torch.tensor([BACKGROUNDS[b] for b in backgrounds] or [[0, 0, 0]], dtype=torch.float32)[:n]
    img = (bg_palette + bg_jitter).view(n, 3, 1, 1) + pix_noise
    obj_mask = obj_mask.view(n, MAX_OBJECTS, size, size)
    obj_pix = obj_pix.view(n, MAX_OBJECTS, 3, size, size)
    for slot in range(MAX_OBJECTS):
        img = torch.where(obj_mask[:, slot].unsqueeze(1), obj_pix[:, slot], img)
    images = img.round().clamp(0, 255).to(torch.uint8)
    part_masks = torch.stack([border, dot], dim=1).view(n, MAX_OBJECTS, len(PARTS), size, size)

    present_k = torch.zeros(n, NUM_CONCEPTS, dtype=torch.bool)
    for i, objs in enumerate(objects):
        for slot, o in enumerate(objs):
            for name in (o.shape, o.color, o.texture, *o.parts):
                present_k[i, _CONCEPT_INDEX[name]] = True
        present_k[i, _CONCEPT_INDEX[f"{backgrounds[i]} background"]] = True
    return SceneBatch(images=images, labels=torch.from_numpy(labels).long(), concepts_present=present_k,
                      object_masks=obj_mask, part_masks=part_masks, objects=objects, backgrounds=backgrounds,
                      seed=seed)


def draw_ring(images: torch.Tensor, centers, radius, width: float = 2.0,
              color: tuple[int, int, int] = RING_COLOR) -> torch.Tensor:
    """Draw one hard-edged ring per image (docs/design.md §3); returns a new tensor, the input is unchanged.

    images: uint8 ``[B, 3, S, S]`` or ``[3, S, S]``; centers: ``[B, 2]`` or ``[2]`` as (x, y) in pixels;
    radius: scalar or ``[B]``. A pixel (x, y) (centres at integer coordinates) is on the ring when
    ``|dist - radius| <= width / 2``; ring pixels become ``color``.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() not in (3, 4) \
            or images.shape[-3] != 3:
        raise InvalidArgument(f"images must be a uint8 tensor [B, 3, S, S] or [3, S, S], got "
                              f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
    single = images.dim() == 3
    imgs = images.unsqueeze(0) if single else images
    B, _, H, W = imgs.shape
    c = torch.as_tensor(centers, dtype=torch.float32).reshape(-1, 2)
    if c.shape[0] == 1 and B > 1:
        c = c.expand(B, 2)
    if c.shape[0] != B:
        raise InvalidArgument(f"centers must be [{B}, 2] (one (x, y) per image), got {tuple(torch.as_tensor(centers).shape)}")
    r = torch.as_tensor(radius, dtype=torch.float32).reshape(-1)
    if r.numel() not in (1, B):
        raise InvalidArgument(f"radius must be a scalar or [{B}], got shape {tuple(r.shape)}")
    if width <= 0:
        raise InvalidArgument(f"width must be > 0, got {width}")
    r = r.expand(B).view(B, 1, 1)
    xs = torch.arange(W, dtype=torch.float32).view(1, 1, W)
    ys = torch.arange(H, dtype=torch.float32).view(1, H, 1)
    dist = torch.sqrt((xs - c[:, 0].view(B, 1, 1)) ** 2 + (ys - c[:, 1].view(B, 1, 1)) ** 2)
    on = ((dist - r).abs() <= width / 2).unsqueeze(1)  # [B, 1, H, W]
    col = torch.tensor(color, dtype=torch.uint8).view(1, 3, 1, 1)
    out = torch.where(on.to(imgs.device), col.to(imgs.device), imgs)
    return out[0] if single else out


def salf_ring_geometry(size: int = TESTBED_IMAGE_SIZE, grid: int = 7, radius_224: float = 32.0,
                       width: float = 2.0) -> tuple[torch.Tensor, float, float]:
    """SALF-CBM default ring grid scaled to ``size``: (centres ``[grid*grid, 2]`` (x, y), radius, width), "inset"."""
    r = radius_224 * size / 224.0
    axis = torch.linspace(r, size - 1 - r, grid)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1), r, width
