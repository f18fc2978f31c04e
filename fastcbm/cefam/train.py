"""Train CE-FAM's translator from a precompute cache alone (no image is decoded):

    fastcbm precompute --data DIR --model CLIP --out CACHE --cefam-classifier NAME [--grid 0]
    train_translator(CACHE, OUT)  →  z_cat rows (memmapped fp16) → Translator → h ≈ CLIP image embedding

Loss (the authors' released code): MSE(h, y) with y the *un-normalised* CLIP image embedding (``global·global_norm``
in the cache), plus λ·MSE(S, S_VLM) over a concept set when one is given, where S = s·cos(h, t) + b and
S_VLM = s·cos(y, t) + b (s, b: the CLIP's logit scale and bias; λ = 0.001). SGD lr 0.1 without momentum, ×0.1 after a
plateau of 6 validation epochs (the paper: 4), early stop after 10 epochs without improvement, ≤ 150 epochs, batch 256.
An optional warm-up (``warmup=True``) raises the rate linearly from ``lr`` to ``warmup_lr`` = 0.2 over
``warmup_epochs`` epochs. A checkpoint (safetensors: weights, best weights, optimizer state, epoch and schedule state)
is written after every epoch; rerunning the same call resumes from it and ends with the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Z_CAT: pooled classifier stages [N, Z] fp16 (precompute --cefam-classifier)
from fastcbm.cache.reader import Z_CAT
from fastcbm.cefam.model import CEFAM, CONFIG_FILE, TRANSLATOR_FILE, CEFAMConfig
from fastcbm.errors import InvalidArgument, MissingFile, OutputExists
from fastcbm.files import atomic_path

log = logging.getLogger("fastcbm.cefam")

CHECKPOINT_FILE = "checkpoint.safetensors"
REPORT_FILE = "train_report.json"

# Recommended settings for the testbed demo (DEMO_SCENES scenes, bundled CNN layer1..layer4 + testbed CLIP), measured
# on a shared, loaded 2-core CPU machine (load average ~15) with one torch thread: global-only precompute with z_cat
# ~10 s of compute for 600 images at batch 64 (the CPU default batch of 4 with 2 threads took 600 s under that load);
# translator training stops early after ~45 epochs in ~35-75 s at batch 32, best val cosine 0.83 (the best constant
# guess: 0.62; closed-form ridge regression on the same z_cat: 0.86). Batch 256 (the paper's): 0.80; batch 64: 0.83
# in 54 s; λ·L_sim over the 21 testbed concepts, warm-up or plateau patience 4 change the cosine by < 0.005.
DEMO_SCENES = 600  # whole pipeline (generate + export + precompute + train): 104 s at load ~15, val cos 0.833
DEMO_PRECOMPUTE: dict[str, Any] = {"grid": 0, "cefam_classifier": "testbed", "batch_size": 64, "num_workers": 0}
DEMO_TRAIN: dict[str, Any] = {"max_epochs": 150, "batch_size": 32, "lr": 0.1, "plateau_patience": 6,
                              "early_stop": 10, "val_fraction": 0.1, "seed": 0, "threads": 1}


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


def _signature(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, translator, best: dict[str, torch.Tensor], optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in translator.state_dict().items()}
    tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best.items()})
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():  # SGD with momentum keeps buffers; plain SGD keeps none
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = v.detach().cpu().contiguous()
    with atomic_path(path) as tmp:  # a kill never leaves a half-written checkpoint
        save_file(tensors, str(tmp), metadata={"state": json.dumps(state), "param_groups": json.dumps(
            [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]])})


def _load_checkpoint(path: Path, translator, optimizer, device) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    tensors = load_file(str(path), device=str(device))
    translator.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    opt = optimizer.state_dict()
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    groups = json.loads(meta.get("param_groups", "[]"))
    for g, saved in zip(opt["param_groups"], groups):
        g.update(saved)
    optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    return best, json.loads(meta["state"])


def _prepare_out(out: Path, signature: str, resume: bool, overwrite: bool) -> Path | None:
    """Check / clean the output folder; return the checkpoint to resume from (or None)."""
    ours = [CONFIG_FILE, TRANSLATOR_FILE, CHECKPOINT_FILE, REPORT_FILE]
    ckpt = out / CHECKPOINT_FILE
    if overwrite:
        for name in ours:
            (out / name).unlink(missing_ok=True)
        return None
    if (out / CONFIG_FILE).exists():
        raise OutputExists(f"out: {out} already holds a trained CE-FAM model; choose another folder or pass "
                           "overwrite=True (--overwrite)")
    if ckpt.exists():
        if not resume:
            raise OutputExists(f"out: {out} holds an unfinished training checkpoint; pass resume=True to continue "
                               "it or overwrite=True (--overwrite) to start afresh")
        from safetensors import safe_open

        with safe_open(str(ckpt), framework="pt") as fh:
            saved = json.loads((fh.metadata() or {}).get("state", "{}")).get("signature")
        if saved != signature:
            raise InvalidArgument(f"out: the checkpoint in {out} was made with other training settings (cache, layers, "
                                  "concepts or optimiser); pass --overwrite to start afresh or choose another --out")
        return ckpt
    if out.exists() and any(out.iterdir()):
        raise OutputExists(f"out: {out} exists and is not empty; choose another folder or pass overwrite=True "
                           "(--overwrite)")
    return None


def train_translator(cache: str | os.PathLike, out: str | os.PathLike | None, *, classifier: str | None = None,
                     layers: Sequence[str] | str | None = None, concepts=None, lam_sim: float = 0.001,
                     lr: float = 0.1, warmup: bool = False, warmup_lr: float = 0.2, warmup_epochs: int = 5,
                     plateau_patience: int = 6, early_stop: int = 10, max_epochs: int = 150, batch_size: int = 256,
                     val_fraction: float = 0.1, seed: int = 0, resume: bool = True, overwrite: bool = False,
                     standardize: bool = False, templates: Sequence[str] = ("{}",),
                     device: str | torch.device = "auto", progress: bool = True, threads: int | None = None,
                     on_epoch: Callable[[int, dict], None] | None = None
                     ) -> tuple[CEFAM, dict]:
    """Train a translator on a cache made with ``fastcbm precompute --cefam-classifier NAME``.

    ``classifier``: must equal the cache's classifier when given (default: read from the manifest). ``layers``: the
    cached stages to use, in this order (a list or ``"layer3,layer4"``; default: all cached stages). ``concepts``: a
    concept file (:func:`fastcbm.concepts.load_concepts`) or list for the L_sim term, encoded with the cache's CLIP
    and ``templates``. Validation rows: a seeded ``val_fraction`` of the cache. ``out``: folder for the model
    (``config.json`` + ``translator.safetensors``), ``train_report.json`` and, while training, the checkpoint that a
    rerun resumes from (``resume``). ``standardize`` (not in the released code, off by default): train on
    (z − μ)/σ per column (μ, σ over the training rows), then fold the affine map into the first layer
    (W₁ ← W₁/σ, b₁ ← b₁ − W₁·μ/σ), so the saved model takes raw z_cat and regions / association run unchanged; the
    deeper stages' larger activations no longer dominate plain SGD (testbed: val cosine 0.85 → 0.92).
    ``on_epoch(epoch, row)`` is called after each epoch's checkpoint. ``threads``:
    torch threads while training (None: unchanged; 1 is fastest for small translators on a shared CPU).
    Returns ``(model, report)``; the model holds the weights of the best validation epoch.
    """
    if threads is not None:  # rerun this call inside torch_threads (which restores the caller's count)
        kwargs = {k: v for k, v in locals().items() if k not in ("cache", "out", "threads")}
        from fastcbm.utils import torch_threads

        with torch_threads(threads):
            return train_translator(cache, out, threads=None, **kwargs)
    from fastcbm.cache import CacheReader
    from fastcbm.cefam.translator import Translator, default_hidden
    from fastcbm.distributed import resolve_device
    from fastcbm.models import load_backbone, load_clip
    from fastcbm.data.split import split_rows

    for name, v in (("lr", lr), ("warmup_lr", warmup_lr), ("batch_size", batch_size), ("max_epochs", max_epochs),
                    ("early_stop", early_stop), ("warmup_epochs", warmup_epochs)):
        if not v > 0:
            raise InvalidArgument(f"{name} must be > 0, got {v}")
    if plateau_patience < 0 or lam_sim < 0:
        raise InvalidArgument(f"plateau_patience and lam_sim must be >= 0, got {plateau_patience}, {lam_sim}")
    t_start = time.perf_counter()
    if not (Path(cache) / "manifest.json").is_file():
        raise MissingFile(f"cache: no fastcbm cache at {cache} (manifest.json missing); run fastcbm precompute "
                          "first")
    reader = CacheReader(cache)
    src = cefam_source(reader)
    if classifier is not None and classifier != src["classifier"]:
        raise InvalidArgument(f"classifier: the cache at {reader.root} holds stages of {src['classifier']!r}, not "
                              f"{classifier!r}")
    layers, widths, cols = _columns(src, layers)
    dev = resolve_device(device)

    concept_names: list[str] = []
    if concepts is not None:
        from fastcbm.concepts import ConceptSet, load_concepts

        if isinstance(concepts, (str, os.PathLike)):
            concepts = load_concepts(concepts)
        concept_names = list(concepts.names if isinstance(concepts, ConceptSet) else concepts)
        if not concept_names:
            raise InvalidArgument("concepts: the concept list is empty")
    clip_info = reader.settings["model"]
    clip, _, tokenizer = load_clip(clip_info["name"], clip_info.get("pretrained"), device=str(dev))
    with torch.no_grad():
        s = float(clip.logit_scale.exp()) if hasattr(clip, "logit_scale") else 100.0
        b = float(clip.logit_bias) if getattr(clip, "logit_bias", None) is not None else 0.0
    text = None
    if concept_names:
        from fastcbm.concepts import encode_texts

        text = encode_texts(clip, tokenizer, concept_names, templates=templates, device=dev, progress=False)
    del clip

    z_dim = sum(widths)
    d = int(reader.arrays["global"].row_shape[0])
    hidden = list(default_hidden(z_dim))
    tr_rows, va_rows = (r.numpy() for r in split_rows(len(reader), val_fraction, seed))
    settings = {"cache": str(reader.root.resolve()), "num_images": len(reader), "classifier": src["classifier"],
                "layers": layers, "concepts": concept_names, "templates": list(templates), "lam_sim": lam_sim,
                "lr": lr, "warmup": warmup, "warmup_lr": warmup_lr, "warmup_epochs": warmup_epochs,
                "plateau_patience": plateau_patience, "early_stop": early_stop, "batch_size": batch_size,
                "val_fraction": val_fraction, "seed": seed, "hidden": hidden}
    if standardize:  # only recorded when on: caches/checkpoints of default runs keep their signature
        settings["standardize"] = True
    signature = _signature(settings)
    out_path = Path(out) if out is not None else None
    ckpt = _prepare_out(out_path, signature, resume, overwrite) if out_path is not None else None

    torch.manual_seed(seed)
    translator = Translator(z_dim, d, hidden).to(dev)
    optimizer = torch.optim.SGD(translator.parameters(), lr=lr, momentum=0.0)
    state: dict[str, Any] = {"signature": signature, "epoch": 0, "lr": lr, "best_val": math.inf, "best_epoch": 0,
                             "plateau_best": math.inf, "plateau_bad": 0, "history": [], "stopped": None,
                             "resumed_from": []}
    best = {k: v.detach().clone() for k, v in translator.state_dict().items()}
    if ckpt is not None:
        best, state = _load_checkpoint(ckpt, translator, optimizer, dev)
        state["resumed_from"] = [*state.get("resumed_from", []), state["epoch"]]
        log.info("resuming CE-FAM translator training from epoch %d (%s)", state["epoch"], ckpt)
    read = _Rows(reader, cols, dev)
    if standardize:
        read.standardize(*_column_stats(read, tr_rows))
    steps_per_epoch = max(1, math.ceil(len(tr_rows) / batch_size))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_epochs, initial=min(state["epoch"], max_epochs), unit="epoch", desc="cefam translator")
    try:
        while state["stopped"] is None and state["epoch"] < max_epochs:
            epoch = state["epoch"]
            t0 = time.perf_counter()
            translator.train()
            perm = torch.randperm(len(tr_rows), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            perm = tr_rows[perm.numpy()]
            sums_t = torch.zeros(3, device=dev, dtype=torch.float64)
            chunks = [perm[lo:lo + batch_size] for lo in range(0, len(perm), batch_size)]
            for i, (z, y) in enumerate(_prefetched(read, chunks)):
                if warmup and epoch < warmup_epochs:  # linear per step from lr to warmup_lr
                    frac = (epoch * steps_per_epoch + i + 1) / (warmup_epochs * steps_per_epoch)
                    rate = lr + (warmup_lr - lr) * frac
                else:
                    rate = state["lr"]
                for g in optimizer.param_groups:
                    g["lr"] = rate
                loss, mse, sim = _losses(translator(z), y, text, s, b, lam_sim)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sums_t += torch.stack([loss.detach(), mse.detach(), sim.detach()]).double() * len(z)  # no GPU sync
            sums = sums_t.cpu().numpy()
            if warmup and epoch + 1 == warmup_epochs:
                state["lr"] = warmup_lr  # the warm-up's peak is the rate the plateau schedule starts from
            translator.eval()
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                   **dict(zip(("train_loss", "train_mse", "train_sim"), (sums / len(perm)).tolist())),
                   **_evaluate(translator, read, va_rows, text, s, b, lam_sim, max(batch_size, 1024))}
            val = row["val_loss"]
            if val < state["best_val"]:
                state["best_val"], state["best_epoch"] = val, epoch + 1
                best = {k: v.detach().clone() for k, v in translator.state_dict().items()}
            # ReduceLROnPlateau(mode="min", factor=0.1, patience, threshold=1e-4 relative), as the released script
            if val < state["plateau_best"] * (1 - 1e-4):
                state["plateau_best"], state["plateau_bad"] = val, 0
            else:
                state["plateau_bad"] += 1
            if state["plateau_bad"] > plateau_patience and not (warmup and epoch < warmup_epochs):
                state["lr"] *= 0.1
                state["plateau_bad"] = 0
            row["seconds"] = round(time.perf_counter() - t0, 3)
            state["history"].append(row)
            state["epoch"] = epoch + 1
            if epoch + 1 - state["best_epoch"] >= early_stop:
                state["stopped"] = "early_stop"
            elif state["epoch"] >= max_epochs:
                state["stopped"] = "max_epochs"
            if out_path is not None:
                out_path.mkdir(parents=True, exist_ok=True)
                _save_checkpoint(out_path / CHECKPOINT_FILE, translator, best, optimizer, state)
            if bar is not None:
                bar.set_postfix_str(f"loss {row['train_loss']:.4g}, val cos {row['val_cos']:.3f}, lr {rate:.3g}",
                                    refresh=False)
                bar.update(1)  # refreshes with this epoch's numbers
            if on_epoch is not None:
                on_epoch(epoch + 1, row)
    finally:
        if bar is not None:
            bar.close()

    translator.load_state_dict(best)
    if standardize:
        _fold_standardization(translator, read.mu, read.sigma)
    translator.eval()
    backbone = load_backbone(src["classifier"], pretrained=src.get("pretrained"), device=str(dev))
    config = CEFAMConfig(classifier=src["classifier"], classifier_pretrained=src.get("pretrained"), layers=layers,
                         clip_model=clip_info["name"], clip_pretrained=clip_info.get("pretrained"), embed_dim=d,
                         in_features=z_dim, hidden=hidden, logit_scale=s, bias=b, kind=src.get("kind", "cnn"),
                         num_prefix_tokens=int(src.get("num_prefix_tokens", 1)),
                         class_names=list(getattr(backbone, "class_names", []) or []), widths=widths)
    model = CEFAM(backbone, translator, config)
    hist = state["history"]
    best_row = next((r for r in hist if r["epoch"] == state["best_epoch"]), {})
    report = {
        "cache": str(reader.root), "classifier": src["classifier"], "layers": layers, "widths": widths,
        "images": {"train": len(tr_rows), "val": len(va_rows)}, "concepts": len(concept_names),
        "logit_scale": s, "bias": b, "epochs_run": state["epoch"], "stopped": state["stopped"] or "interrupted",
        "best_epoch": state["best_epoch"],
        "best": {k: best_row.get(k) for k in ("val_loss", "val_mse", "val_sim", "val_cos")},
        "resumed_from": state.get("resumed_from", []), "config": settings,
        "standardize": bool(standardize), "epochs": hist,
        "seconds": {"this_run": round(time.perf_counter() - t_start, 2),
                    "epochs_total": round(sum(r["seconds"] for r in hist), 2)},
    }
    if out_path is not None:
        model.save(out_path)
        (out_path / REPORT_FILE).write_text(json.dumps(report, indent=2))
        (out_path / CHECKPOINT_FILE).unlink(missing_ok=True)  # finished: the model folder is the result
        report["model"] = str(out_path)
    return model, report
