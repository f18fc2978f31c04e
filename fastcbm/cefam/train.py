"""Train CE-FAM's translator from a precompute cache alone (no image is decoded):

    fastcbm precompute --data DIR --model CLIP --out CACHE --cefam-classifier NAME [--grid 0]
    train_translator(CACHE, OUT)  →  z_cat rows (memmapped fp16) → Translator → h ≈ CLIP image embedding

Loss (the authors' released code): MSE(h, y) with y the *un-normalised* CLIP image embedding (``global·global_norm``
in the cache), plus λ·MSE(S, S_VLM) over a concept set when one is given, where S = s·cos(h, t) + b and
S_VLM = s·cos(y, t) + b (s, b: the CLIP's logit scale and bias). Optimiser and schedule: SGD without momentum, ×0.1
after a validation plateau, early stopping, an optional linear warm-up; every setting and its default (the released
code's) is a field of :class:`TranslatorConfig`, which ``fastcbm cefam train`` builds its options from and the demo
derives its preset from. A checkpoint (safetensors: weights, best weights, optimizer state, epoch and schedule state)
is written after every epoch; rerunning the same call resumes from it and ends with the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Z_CAT: pooled classifier stages [N, Z] fp16 (precompute --cefam-classifier)
from fastcbm.cache.reader import Z_CAT
from fastcbm.cefam.checkpoint import (CHECKPOINT_FILE, REPORT_FILE, load_checkpoint, prepare_out, save_checkpoint,
                                      signature)
from fastcbm.cefam.model import CEFAM, CEFAMConfig
from fastcbm.errors import InvalidArgument, MissingFile

log = logging.getLogger("fastcbm.cefam")


@dataclass(frozen=True)
class TranslatorConfig:
    """Every setting of a translator training run; the defaults are the authors' released code's.

    ``classifier``: must equal the cache's classifier when given (None: read from the manifest). ``layers``: the
    cached stages to use, in this order (None: all cached stages; ``"layer3,layer4"`` is accepted). ``lam_sim``: λ of
    the concept-score MSE (only with concepts). ``lr``: SGD rate, no momentum. ``warmup``: raise the rate linearly
    from ``lr`` to ``warmup_lr`` over ``warmup_epochs`` epochs (off in the released script). ``plateau_patience``:
    epochs without validation improvement before the rate is cut ×0.1 (the released code's 6; the paper says 4).
    ``early_stop``: stop after this many epochs without improvement. ``max_epochs``, ``batch_size`` (the paper's
    256), ``val_fraction``: seeded share of the cache held out for validation, ``seed``: of the split, the
    initialisation and the shuffling. ``standardize`` (not in the released code): train on (z − μ)/σ per column (μ, σ
    over the training rows), then fold the affine map into the first layer (W₁ ← W₁/σ, b₁ ← b₁ − W₁·μ/σ), so the
    saved model takes raw z_cat and regions / association run unchanged; the deeper stages' larger activations no
    longer dominate plain SGD. ``templates``: text templates of the concepts (``"a photo of {}"``).
    """

    classifier: str | None = None
    layers: tuple[str, ...] | None = None
    lam_sim: float = 0.001
    lr: float = 0.1
    warmup: bool = False
    warmup_lr: float = 0.2
    warmup_epochs: int = 5
    plateau_patience: int = 6
    early_stop: int = 10
    max_epochs: int = 150
    batch_size: int = 256
    val_fraction: float = 0.1
    seed: int = 0
    standardize: bool = False
    templates: tuple[str, ...] = ("{}",)

    @classmethod
    def from_settings(cls, base: TranslatorConfig | None = None, **settings: Any) -> TranslatorConfig:
        """``base`` (default: the defaults) with ``settings`` replaced; an unknown name is refused in one line."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise InvalidArgument(f"train_translator: unknown setting(s) {unknown}; the settings are {sorted(names)}")
        layers = settings.get("layers")
        if isinstance(layers, str):
            settings["layers"] = tuple(s.strip() for s in layers.split(","))
        elif layers is not None:
            settings["layers"] = tuple(layers)
        if settings.get("templates") is not None:
            settings["templates"] = tuple(settings["templates"])
        return dataclasses.replace(base or cls(), **settings)

    def validate(self) -> None:
        for name in ("lr", "warmup_lr", "batch_size", "max_epochs", "early_stop", "warmup_epochs"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"{name} must be > 0, got {getattr(self, name)}")
        if self.plateau_patience < 0 or self.lam_sim < 0:
            raise InvalidArgument(f"plateau_patience and lam_sim must be >= 0, got {self.plateau_patience}, "
                                  f"{self.lam_sim}")
        if not 0 < self.val_fraction < 1:
            raise InvalidArgument(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for t in self.templates:
            if t.count("{}") != 1:
                raise InvalidArgument(f"templates: each must contain exactly one '{{}}', got {t!r}")


def cefam_source(reader) -> dict:
    """The cache's CE-FAM record (classifier, pretrained, layers, widths, kind, num_prefix_tokens) or a clear error."""
    src = reader.settings.get("cefam")
    if not src or Z_CAT not in reader.arrays:
        raise InvalidArgument(f"cache {reader.root} has no CE-FAM stage activations (z_cat); run fastcbm precompute with "
                              "--cefam-classifier NAME (and --grid 0 for the cheap global-only mode) into a new --out")
    return src


def _columns(src: dict, layers: Sequence[str] | None) -> tuple[list[str], list[int], np.ndarray | None]:
    """``(layers, widths, columns of z_cat to use or None for all)`` for a subset / reordering of the cached stages."""
    cached, widths = list(src["layers"]), [int(w) for w in src["widths"]]
    if layers is None:
        return cached, widths, None
    layers = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else list(layers)
    bad = [n for n in layers if n not in cached]
    if not layers or bad or len(set(layers)) != len(layers):
        raise InvalidArgument(f"layers: {layers} must be distinct stages among the cached ones {cached} "
                              f"(classifier {src['classifier']!r})")
    offsets = np.cumsum([0, *widths])
    cols = np.concatenate([np.arange(offsets[cached.index(n)], offsets[cached.index(n) + 1]) for n in layers])
    sel = [widths[cached.index(n)] for n in layers]
    return layers, sel, (None if layers == cached else cols)


class _Rows:
    """Reads (z [b, Z] fp32, y [b, D] fp32) for cache rows from the memmapped shards, in cache order."""

    def __init__(self, reader, cols: np.ndarray | None, device: torch.device):
        self.reader, self.cols, self.device = reader, cols, device

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from fastcbm.cache.reader import GLOBAL, GLOBAL_NORM

        rows = np.sort(rows)  # forward through each shard; the loss is a mean, order within a batch is irrelevant
        z = self.reader.array(Z_CAT, rows)
        if self.cols is not None:
            z = z[:, self.cols]
        g = np.asarray(self.reader.array(GLOBAL, rows), dtype=np.float32)
        n = np.asarray(self.reader.array(GLOBAL_NORM, rows), dtype=np.float32)
        z = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(self.device)
        y = torch.from_numpy(g * n[:, None]).to(self.device)  # the un-normalised CLIP image embedding
        if self.mu is not None:
            z = (z - self.mu) / self.sigma
        return z, y

    mu: torch.Tensor | None = None
    sigma: torch.Tensor | None = None

    def standardize(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        """From now on return (z − mu) / sigma (per column)."""
        self.mu, self.sigma = mu.to(self.device), sigma.to(self.device)


def _column_stats(read: _Rows, rows: np.ndarray, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and standard deviation of z_cat over ``rows`` (fp64 sums; sigma floored at 1e-6 and at 1e-3
    of the mean sigma, so a dead channel is not blown up)."""
    s1 = s2 = None
    for lo in range(0, len(rows), chunk):
        z, _ = read(rows[lo:lo + chunk])
        z = z.double()
        s1 = z.sum(0) if s1 is None else s1 + z.sum(0)
        s2 = (z * z).sum(0) if s2 is None else s2 + (z * z).sum(0)
    n = max(len(rows), 1)
    mu = s1 / n
    sigma = (s2 / n - mu * mu).clamp_min(0).sqrt()
    sigma = sigma.clamp_min(max(1e-6, 1e-3 * float(sigma.mean())))
    return mu.float(), sigma.float()


@torch.no_grad()
def _fold_standardization(translator, mu: torch.Tensor, sigma: torch.Tensor) -> None:
    """A translator trained on (z − mu)/sigma → the same function of the raw z: W₁ ← W₁/sigma, b₁ ← b₁ − W₁·(mu/sigma)
    (so the saved model, the regions and the association take raw z_cat exactly like a default one)."""
    w = translator.first.weight
    b = translator.first.bias
    b -= w @ (mu / sigma).to(w)
    w /= sigma.to(w)[None, :]


def _prefetched(read: _Rows, chunks: list[np.ndarray]):
    """Yield ``read(chunk)`` for each chunk while the next one is read from the memmaps in a background thread (the
    arrays are the same as reading in the loop: only the timing overlaps)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastcbm-cefam-reader") as pool:
        nxt = pool.submit(read, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            cur = nxt.result()
            nxt = pool.submit(read, chunks[k + 1]) if k + 1 < len(chunks) else None
            yield cur


def _losses(h: torch.Tensor, y: torch.Tensor, text: torch.Tensor | None, s: float, b: float,
            lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, mse, sim) for a batch; sim = MSE of the scaled concept scores (0 without concepts)."""
    mse = F.mse_loss(h, y)
    if text is None:
        return mse, mse, torch.zeros((), device=h.device)
    sim = F.mse_loss(s * F.normalize(h, dim=-1) @ text.T + b, s * F.normalize(y, dim=-1) @ text.T + b)
    return mse + lam * sim, mse, sim


@torch.no_grad()
def _evaluate(translator, read: _Rows, rows: np.ndarray, text, s, b, lam, batch: int) -> dict[str, float]:
    tot = mse = sim = cos = 0.0
    for lo in range(0, len(rows), batch):
        z, y = read(rows[lo:lo + batch])
        h = translator(z)
        t_, m_, s_ = _losses(h, y, text, s, b, lam)
        k = len(z)
        tot, mse, sim = tot + float(t_) * k, mse + float(m_) * k, sim + float(s_) * k
        cos += float(F.cosine_similarity(h, y, dim=-1).sum())
    n = max(len(rows), 1)
    return {"val_loss": tot / n, "val_mse": mse / n, "val_sim": sim / n, "val_cos": cos / n}


def train_translator(cache: str | os.PathLike, out: str | os.PathLike | None, config: TranslatorConfig | None = None,
                     *, concepts=None, resume: bool = True, overwrite: bool = False,
                     device: str | torch.device = "auto", progress: bool = True, threads: int | None = None,
                     on_epoch: Callable[[int, dict], None] | None = None, **settings: Any) -> tuple[CEFAM, dict]:
    """Train a translator on a cache made with ``fastcbm precompute --cefam-classifier NAME``.

    ``config``: a :class:`TranslatorConfig` (default: its defaults, the released code's); keyword ``settings``
    replace single fields of it (``train_translator(CACHE, OUT, max_epochs=5, batch_size=32)``; an unknown name is
    refused). ``concepts``: a concept file (:func:`fastcbm.concepts.load_concepts`) or list for the L_sim term,
    encoded with the cache's CLIP and ``config.templates``. ``out``: folder for the model (``config.json`` +
    ``translator.safetensors``), ``train_report.json`` and, while training, the checkpoint that a rerun resumes from
    (``resume``; ``overwrite`` replaces what is there; None: nothing written). ``on_epoch(epoch, row)`` is called after
    each epoch's checkpoint. ``threads``: torch threads while training (None: unchanged; 1 is fastest for small
    translators on a shared CPU). Returns ``(model, report)``; the model holds the weights of the best validation
    epoch.
    """
    cfg = TranslatorConfig.from_settings(config, **settings)
    cfg.validate()
    if threads is not None:  # inside torch_threads, which restores the caller's count
        from fastcbm.utils import torch_threads

        with torch_threads(threads):
            return train_translator(cache, out, cfg, concepts=concepts, resume=resume, overwrite=overwrite,
                                    device=device, progress=progress, on_epoch=on_epoch)
    from fastcbm.distributed import resolve_device

    t_start = time.perf_counter()
    dev = resolve_device(device)
    job = _prepare(cache, out, cfg, concepts, resume, overwrite, dev)
    _train(job, progress, on_epoch)
    return _finish(job, t_start)


@dataclass
class _Job:
    """One training run: what was read from the cache, the concept texts, the model and optimiser, and the schedule
    state that the checkpoint carries (``state``; ``best``: the best validation epoch's weights)."""

    cfg: TranslatorConfig
    reader: Any
    src: dict
    layers: list[str]
    widths: list[int]
    read: _Rows
    tr_rows: np.ndarray
    va_rows: np.ndarray
    concept_names: list[str]
    text: torch.Tensor | None  # [T, D] unit concept embeddings, or None without concepts
    logit_scale: float
    bias: float
    clip_info: dict
    settings: dict
    translator: Any
    optimizer: torch.optim.Optimizer
    state: dict
    best: dict[str, torch.Tensor]
    out: Path | None
    device: torch.device


def _prepare(cache, out, cfg: TranslatorConfig, concepts, resume: bool, overwrite: bool,
             dev: torch.device) -> _Job:
    """Open and check the cache, encode the concepts, check the output folder, build the translator and optimiser
    (from the checkpoint when resuming)."""
    from fastcbm.cache import CacheReader
    from fastcbm.cefam.translator import Translator, default_hidden
    from fastcbm.data.split import split_rows

    if not (Path(cache) / "manifest.json").is_file():
        raise MissingFile(f"cache: no fastcbm cache at {cache} (manifest.json missing); run fastcbm precompute "
                          "first")
    reader = CacheReader(cache)
    src = cefam_source(reader)
    if cfg.classifier is not None and cfg.classifier != src["classifier"]:
        raise InvalidArgument(f"classifier: the cache at {reader.root} holds stages of {src['classifier']!r}, not "
                              f"{cfg.classifier!r}")
    layers, widths, cols = _columns(src, cfg.layers)
    concept_names = _concept_names(concepts)
    clip_info = reader.settings["model"]
    text, s, b = _concept_text(clip_info, concept_names, cfg.templates, dev)
    z_dim, d = sum(widths), int(reader.arrays["global"].row_shape[0])
    hidden = list(default_hidden(z_dim))
    tr_rows, va_rows = (r.numpy() for r in split_rows(len(reader), cfg.val_fraction, cfg.seed))
    settings = {"cache": str(reader.root.resolve()), "num_images": len(reader), "classifier": src["classifier"],
                "layers": layers, "concepts": concept_names, "templates": list(cfg.templates),
                "lam_sim": cfg.lam_sim, "lr": cfg.lr, "warmup": cfg.warmup, "warmup_lr": cfg.warmup_lr,
                "warmup_epochs": cfg.warmup_epochs, "plateau_patience": cfg.plateau_patience,
                "early_stop": cfg.early_stop, "batch_size": cfg.batch_size, "val_fraction": cfg.val_fraction,
                "seed": cfg.seed, "hidden": hidden}
    if cfg.standardize:  # only recorded when on: caches/checkpoints of default runs keep their signature
        settings["standardize"] = True
    sig = signature(settings)
    out_path = Path(out) if out is not None else None
    ckpt = prepare_out(out_path, sig, resume, overwrite) if out_path is not None else None

    torch.manual_seed(cfg.seed)
    translator = Translator(z_dim, d, hidden).to(dev)
    optimizer = torch.optim.SGD(translator.parameters(), lr=cfg.lr, momentum=0.0)
    state: dict[str, Any] = {"signature": sig, "epoch": 0, "lr": cfg.lr, "best_val": math.inf,
                             "best_epoch": 0, "plateau_best": math.inf, "plateau_bad": 0, "history": [],
                             "stopped": None, "resumed_from": []}
    best = {k: v.detach().clone() for k, v in translator.state_dict().items()}
    if ckpt is not None:
        best, state = load_checkpoint(ckpt, translator, optimizer, dev)
        state["resumed_from"] = [*state.get("resumed_from", []), state["epoch"]]
        log.info("resuming CE-FAM translator training from epoch %d (%s)", state["epoch"], ckpt)
    read = _Rows(reader, cols, dev)
    if cfg.standardize:
        read.standardize(*_column_stats(read, tr_rows))
    return _Job(cfg, reader, src, layers, widths, read, tr_rows, va_rows, concept_names, text, s, b, clip_info,
                settings, translator, optimizer, state, best, out_path, dev)


def _concept_names(concepts) -> list[str]:
    """The L_sim concept names from a file, a ConceptSet or a list ([] without concepts)."""
    if concepts is None:
        return []
    from fastcbm.concepts import ConceptSet, load_concepts

    if isinstance(concepts, (str, os.PathLike)):
        concepts = load_concepts(concepts)
    names = list(concepts.names if isinstance(concepts, ConceptSet) else concepts)
    if not names:
        raise InvalidArgument("concepts: the concept list is empty")
    return names


def _concept_text(clip_info: dict, names: list[str], templates: Sequence[str],
                  dev: torch.device) -> tuple[torch.Tensor | None, float, float]:
    """``(unit text embeddings [T, D] or None, logit scale s, bias b)`` of the cache's CLIP (loaded, then freed)."""
    from fastcbm.models import load_clip

    clip, _, tokenizer = load_clip(clip_info["name"], clip_info.get("pretrained"), device=str(dev))
    with torch.no_grad():
        s = float(clip.logit_scale.exp()) if hasattr(clip, "logit_scale") else 100.0
        b = float(clip.logit_bias) if getattr(clip, "logit_bias", None) is not None else 0.0
    text = None
    if names:
        from fastcbm.concepts import encode_texts

        text = encode_texts(clip, tokenizer, names, templates=templates, device=dev, progress=False)
    return text, s, b


def _train(job: _Job, progress: bool, on_epoch: Callable[[int, dict], None] | None) -> None:
    """Epochs until the schedule stops (early stop or ``max_epochs``); a checkpoint after each."""
    cfg, state = job.cfg, job.state
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_epochs, initial=min(state["epoch"], cfg.max_epochs), unit="epoch",
                   desc="cefam translator")
    try:
        while state["stopped"] is None and state["epoch"] < cfg.max_epochs:
            epoch = state["epoch"]
            t0 = time.perf_counter()
            row, rate = _epoch(job, epoch)
            _schedule(job, epoch, row)
            row["seconds"] = round(time.perf_counter() - t0, 3)
            state["history"].append(row)
            if job.out is not None:
                job.out.mkdir(parents=True, exist_ok=True)
                save_checkpoint(job.out / CHECKPOINT_FILE, job.translator, job.best, job.optimizer, state)
            if bar is not None:
                bar.set_postfix_str(f"loss {row['train_loss']:.4g}, val cos {row['val_cos']:.3f}, lr {rate:.3g}",
                                    refresh=False)
                bar.update(1)  # refreshes with this epoch's numbers
            if on_epoch is not None:
                on_epoch(epoch + 1, row)
    finally:
        if bar is not None:
            bar.close()


def _epoch(job: _Job, epoch: int) -> tuple[dict, float]:
    """One pass over the training rows in a seeded order, then the validation scores: ``(row, last rate)``."""
    cfg, state, opt = job.cfg, job.state, job.optimizer
    job.translator.train()
    perm = torch.randperm(len(job.tr_rows), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
    perm = job.tr_rows[perm.numpy()]
    steps_per_epoch = max(1, math.ceil(len(job.tr_rows) / cfg.batch_size))
    sums_t = torch.zeros(3, device=job.device, dtype=torch.float64)
    chunks = [perm[lo:lo + cfg.batch_size] for lo in range(0, len(perm), cfg.batch_size)]
    rate = state["lr"]
    for i, (z, y) in enumerate(_prefetched(job.read, chunks)):
        if cfg.warmup and epoch < cfg.warmup_epochs:  # linear per step from lr to warmup_lr
            frac = (epoch * steps_per_epoch + i + 1) / (cfg.warmup_epochs * steps_per_epoch)
            rate = cfg.lr + (cfg.warmup_lr - cfg.lr) * frac
        else:
            rate = state["lr"]
        for g in opt.param_groups:
            g["lr"] = rate
        loss, mse, sim = _losses(job.translator(z), y, job.text, job.logit_scale, job.bias, cfg.lam_sim)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums_t += torch.stack([loss.detach(), mse.detach(), sim.detach()]).double() * len(z)  # no GPU sync
    sums = sums_t.cpu().numpy()
    if cfg.warmup and epoch + 1 == cfg.warmup_epochs:
        state["lr"] = cfg.warmup_lr  # the warm-up's peak is the rate the plateau schedule starts from
    job.translator.eval()
    row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
           **dict(zip(("train_loss", "train_mse", "train_sim"), (sums / len(perm)).tolist())),
           **_evaluate(job.translator, job.read, job.va_rows, job.text, job.logit_scale, job.bias, cfg.lam_sim,
                       max(cfg.batch_size, 1024))}
    return row, rate


def _schedule(job: _Job, epoch: int, row: dict) -> None:
    """After an epoch: keep the best weights, cut the rate after a plateau, decide whether to stop."""
    cfg, state = job.cfg, job.state
    val = row["val_loss"]
    if val < state["best_val"]:
        state["best_val"], state["best_epoch"] = val, epoch + 1
        job.best = {k: v.detach().clone() for k, v in job.translator.state_dict().items()}
    # ReduceLROnPlateau(mode="min", factor=0.1, patience, threshold=1e-4 relative), as the released script
    if val < state["plateau_best"] * (1 - 1e-4):
        state["plateau_best"], state["plateau_bad"] = val, 0
    else:
        state["plateau_bad"] += 1
    if state["plateau_bad"] > cfg.plateau_patience and not (cfg.warmup and epoch < cfg.warmup_epochs):
        state["lr"] *= 0.1
        state["plateau_bad"] = 0
    state["epoch"] = epoch + 1
    if epoch + 1 - state["best_epoch"] >= cfg.early_stop:
        state["stopped"] = "early_stop"
    elif state["epoch"] >= cfg.max_epochs:
        state["stopped"] = "max_epochs"


def _finish(job: _Job, t_start: float) -> tuple[CEFAM, dict]:
    """The best epoch's weights (standardisation folded in) as a CEFAM model, its report, and the model folder."""
    from fastcbm.models import load_backbone

    cfg, state, src, translator = job.cfg, job.state, job.src, job.translator
    translator.load_state_dict(job.best)
    if cfg.standardize:
        _fold_standardization(translator, job.read.mu, job.read.sigma)
    translator.eval()
    backbone = load_backbone(src["classifier"], pretrained=src.get("pretrained"), device=str(job.device))
    config = CEFAMConfig(classifier=src["classifier"], classifier_pretrained=src.get("pretrained"),
                         layers=job.layers, clip_model=job.clip_info["name"],
                         clip_pretrained=job.clip_info.get("pretrained"), embed_dim=translator.out_features,
                         in_features=sum(job.widths), hidden=job.settings["hidden"], logit_scale=job.logit_scale,
                         bias=job.bias, kind=src.get("kind", "cnn"),
                         num_prefix_tokens=int(src.get("num_prefix_tokens", 1)),
                         class_names=list(getattr(backbone, "class_names", []) or []), widths=job.widths)
    model = CEFAM(backbone, translator, config)
    hist = state["history"]
    best_row = next((r for r in hist if r["epoch"] == state["best_epoch"]), {})
    report = {
        "cache": str(job.reader.root), "classifier": src["classifier"], "layers": job.layers, "widths": job.widths,
        "images": {"train": len(job.tr_rows), "val": len(job.va_rows)}, "concepts": len(job.concept_names),
        "logit_scale": job.logit_scale, "bias": job.bias, "epochs_run": state["epoch"],
        "stopped": state["stopped"] or "interrupted", "best_epoch": state["best_epoch"],
        "best": {k: best_row.get(k) for k in ("val_loss", "val_mse", "val_sim", "val_cos")},
        "resumed_from": state.get("resumed_from", []), "config": job.settings,
        "standardize": bool(cfg.standardize), "epochs": hist,
        "seconds": {"this_run": round(time.perf_counter() - t_start, 2),
                    "epochs_total": round(sum(r["seconds"] for r in hist), 2)},
    }
    if job.out is not None:
        model.save(job.out)
        (job.out / REPORT_FILE).write_text(json.dumps(report, indent=2))
        (job.out / CHECKPOINT_FILE).unlink(missing_ok=True)  # finished: the model folder is the result
        report["model"] = str(job.out)
    return model, report
