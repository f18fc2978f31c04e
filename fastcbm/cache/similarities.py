"""P = E·Tᵀ from the cache: on the fly for training, or written to chunked ``.npy`` files for other tools."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fastcbm.files import atomic_path, atomic_write_json
from fastcbm.errors import InvalidArgument


def prompt_similarities(prompt_emb: torch.Tensor, text_emb: torch.Tensor, *, normalize_text: bool = True) -> torch.Tensor:
    """Cosine similarities P[n, g, m] = ⟨E[n, g], T[m]⟩ for unit prompt embeddings ``prompt_emb`` [n, G, D] and
    text embeddings ``text_emb`` [M, D] (normalised here unless ``normalize_text=False``). One GEMM, fp32 or the
    input's dtype."""
    if prompt_emb.dim() != 3:
        raise InvalidArgument(f"prompt_emb: expected [n, G, D], got shape {tuple(prompt_emb.shape)}")
    if text_emb.dim() != 2 or text_emb.shape[1] != prompt_emb.shape[2]:
        raise InvalidArgument(f"text_emb: expected [M, {prompt_emb.shape[2]}], got shape {tuple(text_emb.shape)}")
    t = text_emb.to(prompt_emb.dtype)
    if normalize_text:
        t = torch.nn.functional.normalize(t.float(), dim=-1).to(prompt_emb.dtype)
    n, g, d = prompt_emb.shape
    return (prompt_emb.reshape(n * g, d) @ t.T).reshape(n, g, t.shape[0])


def write_similarities(reader, text_emb: torch.Tensor, out: str | os.PathLike, *, concepts: Sequence[str] | None = None,
                       chunk: int = 4096, dtype: str = "float16", device=None, include_global: bool = True) -> dict:
    """Write P for every cached image to ``out`` in row chunks: ``P-00000.npy`` [rows, G, M] (and
    ``P_global-00000.npy`` [rows, M] for the plain images), plus ``index.json`` (concepts, chunks, cache path).
    Each chunk is written to a temporary name and renamed when complete (no half-written chunk is ever visible)."""
    if chunk < 1:
        raise InvalidArgument(f"chunk must be >= 1, got {chunk}")
    if reader.num_prompts == 0:  # checked before the output folder is created
        raise InvalidArgument(f"the cache at {reader.root} holds global embeddings only (precompute --grid 0): it has no "
                              "prompt embeddings to compare with concepts; run fastcbm precompute with --grid N")
    if dtype not in ("float16", "float32"):
        raise InvalidArgument(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute = torch.float32 if device.type == "cpu" else torch.float16
    t = torch.nn.functional.normalize(text_emb.float(), dim=-1).to(device)
    n = len(reader)
    chunks = []
    for i, lo in enumerate(range(0, n, chunk)):
        hi = min(lo + chunk, n)
        name = f"P-{i:05d}.npy"
        entry = {"file": name, "rows": [lo, hi]}
        p = reader.similarities(t, slice(lo, hi), normalize_text=False, device=device, dtype=compute)
        _save_atomic(out / name, p.float().cpu().numpy().astype(dtype))
        if include_global:
            entry["global_file"] = f"P_global-{i:05d}.npy"
            e0 = reader.global_embeddings(slice(lo, hi), device=device, dtype=compute)
            _save_atomic(out / entry["global_file"], (e0 @ t.to(compute).T).float().cpu().numpy().astype(dtype))
        chunks.append(entry)
    index = {"cache": str(Path(reader.root).resolve()), "num_images": n, "num_prompts": reader.num_prompts,
             "num_concepts": int(t.shape[0]), "dtype": dtype, "concepts": list(concepts) if concepts else None,
             "layout": "P[row, prompt, concept] = cos(prompt embedding, concept text embedding)", "chunks": chunks}
    atomic_write_json(out / "index.json", index)
    return index


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def load_similarities(out: str | os.PathLike) -> np.ndarray:
    """Concatenate the chunks written by :func:`write_similarities` (small outputs only; it reads everything)."""
    out = Path(out)
    index = json.loads((out / "index.json").read_text())
    parts = [np.load(out / c["file"]) for c in index["chunks"]]
    return np.concatenate(parts) if parts else np.zeros((0, index["num_prompts"], index["num_concepts"]))
