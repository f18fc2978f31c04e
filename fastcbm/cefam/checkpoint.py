"""CE-FAM translator checkpoints: written after every epoch of :func:`fastcbm.cefam.train.train_translator` (weights,
best weights, optimizer state, epoch and schedule state, in one safetensors file written atomically) and the output
folder's checks before a run, so a rerun resumes an interrupted run — and only one made with the same settings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from fastcbm.cefam.model import CONFIG_FILE, TRANSLATOR_FILE
from fastcbm.errors import InvalidArgument, OutputExists
from fastcbm.files import atomic_path

CHECKPOINT_FILE = "checkpoint.safetensors"
REPORT_FILE = "train_report.json"


def signature(d: dict) -> str:
    """A short hash of the settings that define a run's result (a checkpoint resumes only under the same)."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, translator, best: dict[str, torch.Tensor], optimizer, state: dict) -> None:
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


def load_checkpoint(path: Path, translator, optimizer, device) -> tuple[dict[str, torch.Tensor], dict]:
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


def prepare_out(out: Path, signature: str, resume: bool, overwrite: bool) -> Path | None:
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
