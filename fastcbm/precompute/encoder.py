"""The encoding step of precompute: uint8 images → (plain + ring-prompted copies, rendered by the prompts kernel
straight into the tower's input buffer, :mod:`fastcbm.precompute.tower`) → the CLIP image tower → unit fp16
embeddings and fp32 norms, plus the configured extra sources; keeps the time spent in each stage."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from fastcbm.cache.reader import FEATURES, GLOBAL, GLOBAL_NORM, PROMPT, PROMPT_NORM, Z_CAT
from fastcbm.cache.store import ArraySpec


class PromptEncoder:
    """Renders prompts and encodes them; keeps the time spent in each stage."""

    def __init__(self, model, *, grid, radius, width, centers, mean, std, device, dtype, max_encode_batch,
                 features: Callable | None, grid_hw: tuple[int, int], cefam: Callable | None = None,
                 tower: str = "eager") -> None:
        from fastcbm.prompts import render_rings

        self.render_rings = render_rings
        self.model, self.device, self.dtype, self.max_encode_batch = model, device, dtype, max_encode_batch
        self.tower_mode, self.tower = tower, None  # the PromptTower, made once the image size is known
        self.ring_kw = dict(grid=grid, radius=radius, width=width, centers=centers, mean=mean, std=std)
        self.features, self.grid_hw = features, grid_hw
        self.times = {"render": 0.0, "encode": 0.0, "features": 0.0, "cefam": 0.0}
        self.cefam, self.global_only = cefam, tuple(grid) == (0, 0)  # global-only: no ring prompts (CE-FAM's mode)

    def probe(self, size: int) -> dict[str, ArraySpec]:
        """Array layout of the outputs, from one plain image through the encoder (and backbone); renders one ring
        batch to validate the prompt settings."""
        img = torch.zeros((1, 3, size, size), dtype=torch.uint8, device=self.device)
        g = 0 if self.global_only else self.render_rings(img, out_dtype=torch.float32, include_plain=False,
                                                         **self.ring_kw).shape[1]
        d = getattr(getattr(self.model, "visual", None), "output_dim", None)  # open_clip towers say it
        if not isinstance(d, int):  # anything else: one forward pass (a first call can cost ~1 s on CPU)
            with torch.inference_mode():
                d = self.model.encode_image(torch.zeros((1, 3, size, size), device=self.device)).shape[-1]
        out = {PROMPT: ArraySpec("float16", (g, d)), PROMPT_NORM: ArraySpec("float32", (g,)),
               GLOBAL: ArraySpec("float16", (d,)), GLOBAL_NORM: ArraySpec("float32", ())}
        if self.features is not None:
            with torch.inference_mode():
                c = self.features(img).shape[1]
            out[FEATURES] = ArraySpec("float16", (c, *self.grid_hw))
        if self.global_only:
            del out[PROMPT], out[PROMPT_NORM]
        if self.cefam is not None:
            out[Z_CAT] = ArraySpec("float16", (int(self.cefam(img).shape[1]),))
        return out

    def _plain(self, images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """uint8 [b, 3, S, S] → normalised [b, 1, 3, S, S] into ``out``: exactly the plain copy render_rings puts first
        (float64 arithmetic, rounded to float32, then the encoder dtype)."""
        m = torch.tensor(self.ring_kw["mean"], dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
        s = torch.tensor(self.ring_kw["std"], dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
        return out.copy_(((images.to(torch.float64) / 255.0 - m) / s).to(torch.float32)[:, None])

    def _tower(self, size: int):
        """The render-into-the-input-buffer + encode loop (:class:`~fastcbm.precompute.tower.PromptTower`)."""
        if self.tower is None:
            from fastcbm.precompute.tower import PromptTower

            if self.global_only:
                copies, render = 1, self._plain
            else:
                copies = 1 + int(self.ring_kw["grid"][0]) * int(self.ring_kw["grid"][1])

                def render(images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                    return self.render_rings(images, out_dtype=self.dtype, include_plain=True, out=out,
                                             **self.ring_kw)

            self.tower = PromptTower(self.model, render, copies=copies, size=size, device=self.device,
                                     dtype=self.dtype, max_encode_batch=self.max_encode_batch, mode=self.tower_mode)
        return self.tower

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """uint8 [b, 3, S, S] → {prompt [b,G,D] f16, prompt_norm [b,G] f32, global [b,D] f16, global_norm [b] f32,
        (features [b,C,gy,gx] f16)}."""
        t0 = time.perf_counter()
        images = images.to(self.device, non_blocking=True)
        tower = self._tower(images.shape[-1])
        rendered = tower.times["render"]
        emb = tower(images)  # [b, 1+G, D] fp32: rendered straight into the tower's input buffer, chunk by chunk
        norms = emb.norm(dim=-1)
        unit = (emb / norms.clamp_min(1e-12).unsqueeze(-1)).to(torch.float16).cpu().numpy()
        norms = norms.cpu().numpy()
        t2 = time.perf_counter()
        render = tower.times["render"] - rendered
        self.times["render"] += render
        self.times["encode"] += t2 - t0 - render
        out = {PROMPT: unit[:, 1:], PROMPT_NORM: norms[:, 1:], GLOBAL: unit[:, 0], GLOBAL_NORM: norms[:, 0]}
        if self.global_only:
            del out[PROMPT], out[PROMPT_NORM]
        if self.features is not None:
            from fastcbm.models.features import resize_to_grid

            with torch.inference_mode():
                f = resize_to_grid(self.features(images).float(), self.grid_hw)
            out[FEATURES] = f.to(torch.float16).cpu().numpy()
            self.times["features"] += time.perf_counter() - t2
        if self.cefam is not None:
            t3 = time.perf_counter()
            out[Z_CAT] = self.cefam(images).to(torch.float16).cpu().numpy()
            self.times["cefam"] += time.perf_counter() - t3
        return out
