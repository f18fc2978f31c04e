"""SALF-CBM (spatially-aware label-free concept bottleneck model): a 1×1-conv concept bottleneck on a frozen
backbone's feature maps, trained to match CLIP's local image–concept similarities from red-circle prompts, then a
sparse linear head on the pooled concept maps. Its explanations say which concepts decided a prediction and where
they are.

- :mod:`~fastcbm.salf.train`: :func:`train_salf_from_cache` with :class:`TrainConfig` (``fastcbm salf train``);
  :mod:`~fastcbm.salf.pipeline`: :func:`fit_salf` on in-memory tensors; :mod:`~fastcbm.salf.bottleneck`: the concept
  layer and its cubic-cosine training; :mod:`~fastcbm.salf.data`: row sources (tensors or a cache).
- :mod:`~fastcbm.salf.model`: :class:`SALFCBM` (save / load a model folder).
- :mod:`~fastcbm.salf.explain`: ``explain`` (the function is not re-exported here: the name is its module's),
  :func:`explain_region` (Explain Anything), :func:`intervene`,
  :func:`decision_rules`; :mod:`~fastcbm.salf.bulk`: :func:`explain_folder`.
- :mod:`~fastcbm.salf.evaluate`: accuracy on a cache or images, zero-shot segmentation (``fastcbm salf evaluate``).
- :mod:`~fastcbm.salf.demo`: the testbed demo (``fastcbm demo``); :mod:`~fastcbm.salf.report`: its HTML page.
"""

from __future__ import annotations

from fastcbm.salf.bulk import explain_folder
from fastcbm.salf.demo import DemoConfig, run_demo
from fastcbm.salf.evaluate import evaluate_cache, evaluate_images, evaluate_segmentation
from fastcbm.salf.explain import Explanation, class_heatmap, decision_rules, explain_region, intervene
from fastcbm.salf.model import SALFCBM, SALFConfig
from fastcbm.salf.pipeline import FitReport, SALFFitConfig, fit_salf
from fastcbm.salf.report import write_salf_report
from fastcbm.salf.train import ConceptFilterConfig, TrainConfig, train_salf_from_cache

__all__ = ["ConceptFilterConfig", "DemoConfig", "Explanation", "FitReport", "SALFCBM", "SALFConfig", "SALFFitConfig",
           "TrainConfig", "class_heatmap", "decision_rules", "evaluate_cache", "evaluate_images",
           "evaluate_segmentation", "explain_folder", "explain_region", "fit_salf", "intervene",
           "run_demo", "train_salf_from_cache", "write_salf_report"]
