"""Concept text → unit text embeddings ``[n, D]`` with an open_clip-style model: the one text encoder of fastcbm
(SALF-CBM's concepts, CE-FAM's concept scores, DEAL's captions, ``fastcbm similarities``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from fastcbm.errors import InvalidArgument


def encode_texts(
    model,
    tokenizer: Callable[..., torch.Tensor],
    texts: Sequence[str],
    templates: Sequence[str] = ("{}",),
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
    *,
    grad: bool = False,
    check_length: bool = False,
) -> torch.Tensor:
    """Unit text embeddings ``[n, D]`` (float32, on ``device``) from an open_clip-style model.

    Each template (a format string with one ``{}``) is filled with each text, tokenized (``tokenizer(list[str])``),
    embedded with ``model.encode_text(tokens)`` in batches, and L2-normalised; the template embeddings are averaged
    and renormalised (CLIP's prompt ensembling). ``device`` defaults to the model's. ``grad``: keep the autograd graph
    (DEAL trains the text tower through its captions); ``check_length``: refuse a text longer than the tokenizer's
    context (:func:`tokenize_checked`) instead of letting it be truncated silently.
    """
    texts = list(texts)
    templates = list(templates)
    if not texts:
        raise InvalidArgument("texts is empty")
    if any(not isinstance(t, str) for t in texts):
        raise InvalidArgument("texts must be strings")
    if not templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
        raise InvalidArgument(f"templates must be format strings with exactly one '{{}}', got {templates!r}")
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
    if not hasattr(model, "encode_text"):
        raise InvalidArgument(f"model must have an encode_text(tokens) method, got {type(model).__name__}")
    if device is None:
        param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    tokenize = (lambda batch: tokenize_checked(tokenizer, batch)) if check_length else tokenizer
    total = None
    steps = [(t, s) for t in templates for s in range(0, len(texts), batch_size)]
    chunks: dict[str, list[torch.Tensor]] = {t: [] for t in templates}
    with torch.set_grad_enabled(grad):
        for tmpl, s in tqdm(steps, desc="encoding texts", disable=not progress, leave=False):
            tokens = tokenize([tmpl.format(x) for x in texts[s:s + batch_size]]).to(device)
            chunks[tmpl].append(torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1))
        for tmpl in templates:
            emb = torch.cat(chunks.pop(tmpl))
            total = emb if total is None else total + emb
        return torch.nn.functional.normalize(total, dim=-1)


def tokenize_checked(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """``tokenizer(texts)`` ``[N, ctx]``, with an :class:`~fastcbm.errors.InvalidArgument` naming the first text that
    does not fit the context.

    Truncating tokenizers (the testbed's, open_clip's) cut an overlong text silently; we tokenize once more with a
    4× longer context and count the non-padding tokens (padding id 0, as both use)."""
    texts = list(texts)
    tokens = tokenizer(texts)
    ctx = tokens.shape[-1]
    try:
        long = tokenizer(texts, context_length=4 * ctx)
    except TypeError:  # a tokenizer without a context argument: cannot check
        return tokens
    lengths = (long != 0).sum(dim=-1)
    for i, text in enumerate(texts):
        if int(lengths[i]) > ctx:
            raise InvalidArgument(f"text too long for the tokenizer's context: {int(lengths[i])} > {ctx} tokens: "
                                  f"{text[:120]!r}; shorten it or use a model with a longer context")
    return tokens
