"""DEAL (disentangle and localize): fine-tune CLIP so its concept explanations are distinct from each other and add up
to the category's explanation, with explanation gradients that actually reach the weights (docs/design.md §3).

- :mod:`fastcbm.deal.explain`: differentiable explanations ``[B, K+1, h, w]`` (Grad-CAM on layer4 / last-block
  attention relevance), batched over the K+1 texts with one tower pass.
- :mod:`fastcbm.deal.data`: concepts JSON, captions, the testbed's concepts.
- :mod:`fastcbm.deal.losses`: separation / consistency / sparsity (code and paper forms), InfoNCE, ``deal_loss``.
- :mod:`fastcbm.deal.train`: ``DealConfig``, ``train_deal`` (``fastcbm deal train``).
"""

from fastcbm.deal.explain import encode_text_rows, explanations

__all__ = ["encode_text_rows", "explanations"]
