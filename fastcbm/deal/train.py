"""DEAL fine-tuning (``fastcbm deal train``): symmetric InfoNCE on concept-augmented captions plus the explanation
regularisers of :mod:`fastcbm.deal.losses`, computed on differentiable explanations (:mod:`fastcbm.deal.explain`), so
the regularisers really train the image tower. ``plain=True`` gives the baseline: same steps, data order and captions,
regularisers off (plain contrastive fine-tuning, which is what the authors' released code amounts to).

Output folder::

    out/config.json            {"format": "fastcbm-deal", "base_model", "pretrained", ...}: load_clip(out) rebuilds it
    out/weights.safetensors    the fine-tuned CLIP's state dict (fp32)
    out/train_report.json      settings, loss curve, timings
    out/checkpoint/            model + Adam state (safetensors) + state.json, for resume
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcbm.deal.data import (CAPTION_FORMS, captions, class_display_name, load_concepts_json, match_classes,
                               select_concepts)
from fastcbm.concepts.encode import tokenize_checked
from fastcbm.deal.explain import MODES, RESNET_LAYERS, explanations
from fastcbm.deal.losses import LOSS_FORMS, deal_loss
from fastcbm.configs import JsonConfig
from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile
from fastcbm.files import atomic_path, atomic_write_json
from fastcbm.models.inputs import CLIP_MEAN, CLIP_STD, normalize_uint8

log = logging.getLogger("fastcbm.deal")

FORMAT = "fastcbm-deal"


class NonFiniteLossError(ValueError):
    """The loss became NaN/inf; the message names the step and the checkpoint that was kept."""


@dataclass
class DealConfig(JsonConfig):
    """DEAL's published settings (docs/design.md §3) plus run options.

    ``steps``: total optimiser steps (``None``: ``epochs`` passes over the data, ``⌊N / batch_size⌋`` steps each).
    ``plain``: the baseline (same steps and captions, regularisers off). ``mode``: how the K+1 explanation VJPs are
    batched (:func:`fastcbm.deal.explain.score_grads`). ``amp``: bf16 autocast, on CUDA only (fp32 master weights
    always). ``checkpoint_every``: steps between checkpoints (0: only at the end). ``explain_text_grad`` (default
    False): the K+1 explained texts are encoded without gradient, so the regularisers train the image tower (what
    DEAL's explanations are for; the text tower still trains through the captions); True also sends the
    regularisers' gradient into the text tower through those texts — most of a DEAL step's extra cost on big text
    towers (bench/deal.py: 2.5× a plain step on a ViT-B/32-shaped model, against 1.5× without).
    ``explain_layer``: the ResNet stage Grad-CAM explains, ``"layer4"`` (as published) or ``"layer3"`` (2× finer
    grid; gradients through layer4 and the pool); ViT towers are always explained at their last block."""

    json_unknown = "ignore"  # older output folders carry keys this version dropped

    lr: float = 5e-7
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 1e-3
    lambda_sep: float = 0.1
    lambda_con: float = 0.01
    lambda_spa: float = 5e-4
    k: int = 5
    caption_form: str = "code"
    loss_form: str = "code"
    batch_size: int = 32
    steps: int | None = None
    epochs: int = 1
    seed: int = 0
    plain: bool = False
    mode: str = "auto"
    amp: bool = True
    checkpoint_every: int = 100
    workers: int = 0
    explain_text_grad: bool = False
    explain_layer: str = "layer4"

    def validate(self) -> None:
        if self.caption_form not in CAPTION_FORMS:
            raise InvalidArgument(f"caption_form must be one of {CAPTION_FORMS}, got {self.caption_form!r}")
        if self.loss_form not in LOSS_FORMS:
            raise InvalidArgument(f"loss_form must be one of {LOSS_FORMS}, got {self.loss_form!r}")
        if self.mode not in MODES:
            raise InvalidArgument(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.explain_layer not in RESNET_LAYERS:
            raise InvalidArgument(f"explain_layer must be one of {RESNET_LAYERS}, got {self.explain_layer!r}")
        if self.mode == "fast" and self.explain_layer != "layer4":
            raise InvalidArgument("mode 'fast' (closed-form Grad-CAM weights) needs explain_layer 'layer4'")
        if self.batch_size < 2:
            raise InvalidArgument(f"batch_size must be >= 2 (InfoNCE needs negatives), got {self.batch_size}")
        if self.k < 1:
            raise InvalidArgument(f"k must be >= 1, got {self.k}")
        if self.steps is not None and self.steps < 1:
            raise InvalidArgument(f"steps must be >= 1, got {self.steps}")
        if self.epochs < 1:
            raise InvalidArgument(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise InvalidArgument(f"lr must be > 0, got {self.lr}")



# ---- data --------------------------------------------------------------------------------------------------------
class _Source:
    """Images + labels + class names, from an ImageFolder directory or in memory.

    ``batch(indices) -> (uint8 [b, 3, S, S], labels [b], n_bad)``: unreadable files are dropped from the batch."""

    def __init__(self, data, size: int):
        self.size = size
        if isinstance(data, (str, os.PathLike)):
            self._init_folder(Path(data))
        else:
            self._init_memory(data)

    def _init_folder(self, root: Path) -> None:
        from fastcbm.data.folder import ImageFileDataset, list_images
        from fastcbm.data.labels import folder_labels

        if not root.is_dir():
            raise MissingFile(f"data: {root} is not a directory (expected an ImageFolder root/<class>/<image>)")
        if (root / "images").is_dir() and (root / "labels.csv").is_file():
            root = root / "images"  # a `fastcbm testbed export` folder
        files = list_images(root)
        if any(Path(f).parent == root for f in files):
            raise InvalidFile(f"data: {root} has images outside class folders (expected an ImageFolder "
                              "root/<class>/<image>)")
        self.labels, self.class_names = folder_labels(files)
        self.dataset = ImageFileDataset(files, self.size)
        self.images = None
        self.description = str(root)

    def _init_memory(self, data) -> None:
        from fastcbm.data import synthetic

        if isinstance(data, synthetic.SceneBatch):
            images, labels, names = data.images, data.labels, synthetic.class_names()
        elif isinstance(data, (tuple, list)) and len(data) == 3:
            images, labels, names = data
        else:
            raise InvalidArgument("data must be an ImageFolder directory, a testbed SceneBatch or a tuple "
                                  "(uint8 images [N, 3, S, S], labels [N], class names)")
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise InvalidArgument(f"data: images must be uint8 [N, 3, S, S], got {getattr(images, 'dtype', None)}")
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic",
                                   align_corners=False).round().clamp(0, 255).to(torch.uint8)
        self.images, self.labels = images, torch.as_tensor(labels).long()
        used = sorted(set(self.labels.tolist()))
        self.class_names = [names[i] for i in used]
        remap = torch.full((len(names),), -1, dtype=torch.long)
        remap[torch.tensor(used)] = torch.arange(len(used))
        self.labels = remap[self.labels]
        self.dataset = None
        self.description = f"in-memory ({len(self.labels)} images)"

    def __len__(self) -> int:
        return int(self.labels.numel())

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self.images is not None:
            idx = torch.tensor(indices)
            return self.images[idx], self.labels[idx], 0
        items = [self.dataset[i] for i in indices]
        good = [(img, int(self.labels[i])) for i, img, _ in items if img is not None]
        bad = len(items) - len(good)
        if not good:
            return torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), bad
        return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), bad


def _batches(n: int, cfg: DealConfig, total: int) -> list[list[int]]:
    """The index batches of every step: a fresh permutation per epoch from (seed, epoch), full batches only."""
    per_epoch = max(n // cfg.batch_size, 1)
    out: list[list[int]] = []
    epoch = 0
    while len(out) < total:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)).tolist()
        for j in range(per_epoch):
            out.append(perm[j * cfg.batch_size:(j + 1) * cfg.batch_size])
        epoch += 1
    return out[:total]


# ---- checkpoints ---------------------------------------------------------------------------------------------------
def _atomic_save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def _atomic_json(obj, path: Path) -> None:
    atomic_write_json(path, obj, indent=2)


def _save_checkpoint(out: Path, model, opt, names: dict, step: int, meta: dict) -> None:
    ck = out / "checkpoint"
    ck.mkdir(parents=True, exist_ok=True)
    _atomic_save(model.state_dict(), ck / "model.safetensors")
    state = {}
    for p, st in opt.state.items():
        for key, val in st.items():
            state[f"{names[p]}::{key}"] = val if isinstance(val, torch.Tensor) else torch.tensor(val)
    _atomic_save(state, ck / "optimizer.safetensors")
    _atomic_json({**meta, "step": step}, ck / "state.json")  # written last: it marks the checkpoint complete


def _load_checkpoint(out: Path, model, opt, names: dict, device) -> dict | None:
    from safetensors.torch import load_file

    ck = out / "checkpoint"
    if not (ck / "state.json").is_file():
        return None
    meta = json.loads((ck / "state.json").read_text())
    model.load_state_dict(load_file(str(ck / "model.safetensors"), device=str(device)))
    saved = load_file(str(ck / "optimizer.safetensors"), device=str(device))
    by_name = {v: p for p, v in names.items()}
    for key, val in saved.items():
        pname, what = key.split("::")
        opt.state[by_name[pname]][what] = val
    return meta


def _check_resume(meta: dict, model_name: str, pretrained, cfg: DealConfig, out: Path) -> None:
    theirs = dict(meta.get("config", {}))
    mine = cfg.to_json()
    for k in ("steps", "epochs", "checkpoint_every", "workers"):  # may change between runs
        theirs.pop(k, None)
        mine.pop(k, None)
    if meta.get("base_model") != model_name or meta.get("pretrained") != pretrained or theirs != mine:
        raise InvalidArgument(f"out: {out} holds a checkpoint of a different run (model {meta.get('base_model')!r}, "
                              f"settings differ); use another --out or --no-resume")


# ---- training ------------------------------------------------------------------------------------------------------
def _normalizer(model, device):
    mean = getattr(model.visual, "image_mean", None) or CLIP_MEAN
    std = getattr(model.visual, "image_std", None) or CLIP_STD
    return lambda u8: normalize_uint8(u8, mean, std, device=device)


def _image_size(model) -> int:
    size = model.visual.image_size
    return int(size if isinstance(size, int) else size[0])


def train_deal(data, concepts, model_name: str = "testbed", config: DealConfig | None = None,
               out: str | os.PathLike | None = None, *, pretrained: str | None = None, resume: bool = True,
               progress: bool = True, device: str | torch.device = "cpu") -> dict:
    """Fine-tune a CLIP with DEAL; returns the train report (also written to ``out/train_report.json``).

    data: an ImageFolder directory (``root/<class>/<image>``; a ``fastcbm testbed export`` folder works too), a testbed
    ``SceneBatch`` or ``(uint8 images [N, 3, S, S], labels [N], class names)``. concepts: a path to the authors' JSON
    ``{class: [descriptors]}`` or such a dict (first ``config.k`` descriptors used; folder names match keys with ``_``
    read as a space). model_name: ``"testbed"``, an open_clip name (``"ViT-B-32"``, with ``pretrained``) or a previous
    DEAL output folder. ``out``: where weights, report and checkpoints go (``None``: nothing written, no resume)."""
    from tqdm.auto import tqdm

    from fastcbm.models import load_clip

    cfg = config or DealConfig()
    cfg.validate()
    device = torch.device(device)
    concepts = (load_concepts_json(concepts, cfg.k) if isinstance(concepts, (str, os.PathLike))
                else select_concepts(dict(concepts), cfg.k))
    model, _, tokenizer = load_clip(model_name, pretrained, device=str(device))
    model.float().eval()  # eval mode as published; fp32 master weights
    source = _Source(data, _image_size(model))
    if len(source) < cfg.batch_size:
        raise InvalidArgument(f"data: {len(source)} images, fewer than one batch (batch_size={cfg.batch_size})")
    per_class = match_classes(source.class_names, concepts)
    display = [class_display_name(c, concepts) for c in source.class_names]
    cap_texts = [captions(d, per_class[c], cfg.caption_form) for c, d in zip(source.class_names, display)]
    expl_texts = [t for c, d in zip(source.class_names, display) for t in [d, *per_class[c]]]
    cap_tokens = tokenize_checked(tokenizer, cap_texts).to(device)  # [C, ctx]
    expl_tokens = tokenize_checked(tokenizer, expl_texts).to(device)  # [C·(K+1), ctx]
    T = cfg.k + 1
    total = cfg.steps or cfg.epochs * max(len(source) // cfg.batch_size, 1)
    batches = _batches(len(source), cfg, total)
    normalize = _normalizer(model, device)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = {p: n for n, p in named}
    opt = torch.optim.Adam([p for _, p in named], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                           weight_decay=cfg.weight_decay)
    meta = {"format": FORMAT, "base_model": model_name, "pretrained": pretrained, "config": cfg.to_json(),
            "classes": source.class_names, "k": cfg.k}
    out_dir = Path(out) if out is not None else None
    start, history = 0, []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            saved = _load_checkpoint(out_dir, model, opt, names, device)
            if saved is not None:
                _check_resume(saved, model_name, pretrained, cfg, out_dir)
                start, history = int(saved["step"]), list(saved.get("history", []))
                log.info("resuming %s at step %d", out_dir, start)
    last_good = start
    amp = cfg.amp and device.type == "cuda"
    bad_images = skipped = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=start, disable=not progress, desc="deal" if not cfg.plain else "plain",
               dynamic_ncols=True)
    try:
        for step in range(start, total):
            u8, labels, bad = source.batch(batches[step])
            bad_images += bad
            if labels.numel() < 2:
                skipped += 1
                bar.update(1)
                continue
            labels = labels.to(device)
            x = normalize(u8)
            classes, inv = torch.unique(labels, return_inverse=True)
            rows = (classes.view(-1, 1) * T + torch.arange(T, device=device)).flatten()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                if cfg.explain_text_grad or cfg.plain:
                    text = model.encode_text(torch.cat([cap_tokens[classes], expl_tokens[rows]]))
                    cap_text, expl_text = text[: classes.numel()], text[classes.numel():]
                else:
                    cap_text = model.encode_text(cap_tokens[classes])
                    with torch.no_grad():
                        expl_text = model.encode_text(expl_tokens[rows])
                cap_emb = cap_text[inv]  # [B, D]
                expl_emb = expl_text.view(classes.numel(), T, -1)[inv]  # [B, K+1, D]
                if cfg.plain:
                    maps, img_emb = None, model.encode_image(x)
                else:
                    maps, img_emb = explanations(model, x, expl_emb, mode=cfg.mode, return_embedding=True,
                                                 layer=cfg.explain_layer)
                    maps = maps.float()  # the regularisers sum over pixels and pairs: fp32 under autocast
                terms = deal_loss(maps, img_emb, cap_emb, model.logit_scale.exp(), lambda_sep=cfg.lambda_sep,
                                  lambda_con=cfg.lambda_con, lambda_spa=cfg.lambda_spa, form=cfg.loss_form)
            loss = terms["loss"]
            if not bool(torch.isfinite(loss)):
                where = (f"the last good checkpoint (step {last_good}) is kept in {out_dir / 'checkpoint'}"
                         if out_dir is not None and last_good > 0 else "no checkpoint was written")
                raise NonFiniteLossError(f"loss is {float(loss.detach())} at step {step + 1}; stopped, {where}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # as open_clip's training: keep the temperature in range
                model.logit_scale.clamp_(0, math.log(100))
            row = {"step": step + 1, **{k: round(float(v.detach()), 6) for k, v in terms.items()}}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", nce=f"{row['contrastive']:.4f}",
                            sep=f"{row['separation']:.3g}", con=f"{row['consistency']:.3g}",
                            spa=f"{row['sparsity']:.3g}", refresh=False)
            bar.update(1)
            done = step + 1
            if out_dir is not None and done < total and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                _save_checkpoint(out_dir, model, opt, names, done, {**meta, "history": history})
                last_good = done
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    ran = max(total - start, 0)
    report = {
        **meta, "steps": total, "resumed_from": start, "images": len(source), "data": source.description,
        "captions": dict(zip(display, cap_texts)), "bad_images": bad_images, "skipped_steps": skipped,
        "seconds": round(seconds, 3), "seconds_per_step": round(seconds / ran, 4) if ran else None,
        "device": str(device), "amp": amp, "history": history,
        "final": history[-1] if history else None,
    }
    if out_dir is not None:
        _save_checkpoint(out_dir, model, opt, names, total, {**meta, "history": history})
        _atomic_save(model.state_dict(), out_dir / "weights.safetensors")
        _atomic_json({"format": FORMAT, "base_model": model_name, "pretrained": pretrained,
                      "weights": "weights.safetensors", "plain": cfg.plain, "explain_layer": cfg.explain_layer,
                      # what `fastcbm deal evaluate` scores the model with when no --concepts is given
                      "k": cfg.k, "concepts": concepts},
                     out_dir / "config.json")
        _atomic_json(report, out_dir / "train_report.json")
    return report


def load_deal_clip(path: str | os.PathLike, device: str = "cpu"):
    """``(model, preprocess, tokenizer)`` of a DEAL output folder (its ``config.json`` names the base model)."""
    from safetensors.torch import load_file

    from fastcbm.models import load_clip

    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise MissingFile(f"model: {path} has no config.json (not a fastcbm deal train output folder)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != FORMAT:
        raise InvalidFile(f"model: {cfg_path} is not a fastcbm DEAL config (format {cfg.get('format')!r})")
    weights = path / cfg.get("weights", "weights.safetensors")
    if not weights.is_file():
        raise MissingFile(f"model: {weights} is missing (training did not finish?)")
    # the base architecture; pretrained weights are not needed (all of them are replaced), so nothing is downloaded
    model, preprocess, tokenizer = load_clip(cfg["base_model"], None, device=device)
    model.load_state_dict(load_file(str(weights), device=str(device)))
    return model.eval(), preprocess, tokenizer
