"""Label-free CBM's concept filter (length, similarity to a class name, similarity between concepts, presence in the
images), its calibrated cut-offs and presets, and the optional sentence model it averages with CLIP."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fastcbm.concepts.load import ConceptSet
from fastcbm.errors import InvalidArgument

log = logging.getLogger("fastcbm.concepts")


@dataclass
class FilterReport:
    """Why each dropped concept was dropped. ``dropped`` maps concept → (stage, reason); stages in order are
    ``"length"``, ``"class_similarity"``, ``"concept_similarity"``, ``"presence"``."""

    kept: list[str]
    dropped: dict[str, tuple[str, str]] = field(default_factory=dict)

    def drop(self, name: str, stage: str, why: str) -> None:
        """Record why ``name`` was dropped (the first stage that drops a concept is the one reported)."""
        self.dropped.setdefault(name, (stage, why))

    def count(self, stage: str) -> int:
        return sum(1 for s, _ in self.dropped.values() if s == stage)

    def summary(self) -> str:
        stages = ("length", "class_similarity", "concept_similarity", "presence")
        parts = ", ".join(f"{s}: {self.count(s)}" for s in stages)
        return f"kept {len(self.kept)} of {len(self.kept) + len(self.dropped)} concepts; dropped by {parts}"


def _encode(text_encoder: Callable[[list[str]], torch.Tensor], texts: list[str], what: str) -> torch.Tensor:
    emb = text_encoder(list(texts))
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(texts):
        got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise InvalidArgument(f"text_encoder must return a [{len(texts)}, D] tensor for the {what}, got {got}")
    # Renormalise: cosine similarity is what the cut-offs mean, whatever the encoder's scaling.
    return torch.nn.functional.normalize(emb.detach().float(), dim=1)


def _presence(image_embeddings: torch.Tensor, text_emb: torch.Tensor, top_k: int, chunk: int = 16384) -> torch.Tensor:
    """Mean of the top-k image similarities per concept ``[n]``, streaming over image chunks (no [N, n] matrix)."""
    text_emb = text_emb.to(image_embeddings.device)
    best = None
    for s in range(0, image_embeddings.shape[0], chunk):
        sims = image_embeddings[s:s + chunk].float() @ text_emb.T  # [chunk, n]
        cand = sims if best is None else torch.cat([best, sims], 0)
        best = cand.topk(min(top_k, cand.shape[0]), dim=0).values
    return best.mean(0).cpu()


def filter_concepts(
    concepts: Sequence[str] | ConceptSet,
    class_names: Sequence[str],
    text_encoder: Callable[[list[str]], torch.Tensor],
    *,
    max_length: int = 30,
    class_sim_cutoff: float = 0.85,
    concept_sim_cutoff: float = 0.9,
    image_embeddings: torch.Tensor | None = None,
    presence_cutoff: float | str | None = None,
    top_k: int = 5,
    sentence_encoder: Callable[[list[str]], torch.Tensor] | None = None,
    duplicate_rule: str = "total_similarity",
    class_text_matches: bool = True,
) -> tuple[list[str], FilterReport]:
    """Filter a concept list as label-free CBMs do, in their order; returns ``(kept, report)``.

    1. length: drop concepts longer than ``max_length`` characters;
    2. class matches (``class_text_matches``): a concept that *is* a class name ("tiger", "a tiger", "The tiger",
       "TIGER", "Tiger": the "a/an/the" and case variants label-free CBM removes as text) is dropped first;
    3. class similarity: drop a concept whose similarity to any class name is ≥ ``class_sim_cutoff``;
    4. concept similarity: of a pair with similarity ≥ ``concept_sim_cutoff`` drop the one with the smaller total
       similarity to all concepts (label-free CBM's released code keeps the more general one; ties drop the later);
       ``duplicate_rule="later"`` drops the later one instead (greedy in list order);
    5. presence (only with ``presence_cutoff``, a number or a preset name of :data:`PRESENCE_CUTOFFS`): drop a
       concept whose mean top-``top_k`` similarity to ``image_embeddings`` ``[N, D]`` (unit rows, same space as the
       text) is ≤ the cut-off.

    Similarity (stages 3-4) is label-free CBM's (mpnet + 3·CLIP)/4 when ``sentence_encoder`` (e.g.
    :func:`load_sentence_encoder`: all-mpnet-base-v2) is given, else the ``text_encoder``'s cosine alone.

    Exact repeats in ``concepts`` are removed first (keeping the first; the report is keyed by name).
    ``text_encoder(list[str]) -> [n, D]`` embeds texts (e.g. a CLIP text tower; see :func:`encode_texts`); its
    outputs are renormalised. A cut-off of ``None`` (or ``max_length=None``) switches that stage off.
    """
    names, class_names, presence_cutoff = _checked_inputs(concepts, class_names, duplicate_rule, presence_cutoff,
                                                          image_embeddings, top_k)
    report = FilterReport(kept=[])
    # 1. length
    alive = []
    for c in names:
        if max_length is not None and len(c) > max_length:
            report.drop(c, "length", f"{len(c)} characters > {max_length}")
        else:
            alive.append(c)
    # 2. a concept that is a class name, as text
    if alive and class_names and class_text_matches:
        alive = _drop_class_names(alive, class_names, report)
    texts = _Texts(alive, text_encoder, sentence_encoder)
    # 3. similarity to a class name
    if texts.names and class_names and class_sim_cutoff is not None:
        texts = _drop_like_classes(texts, class_names, class_sim_cutoff, report)
    # 4. near-duplicate concepts
    if texts.names and concept_sim_cutoff is not None:
        texts = _drop_near_duplicates(texts, concept_sim_cutoff, duplicate_rule, report)
    alive = texts.names
    # 5. presence in the training images
    if alive and presence_cutoff is not None:
        if image_embeddings.shape[1] != texts.emb.shape[1]:
            raise InvalidArgument(f"image_embeddings have D={image_embeddings.shape[1]}, text embeddings "
                                  f"D={texts.emb.shape[1]}")
        score = _presence(image_embeddings, texts.emb, top_k)
        keep = []
        for i, c in enumerate(alive):
            if float(score[i]) <= presence_cutoff:
                report.drop(c, "presence", f"mean top-{top_k} image similarity {float(score[i]):.3f} <= "
                                           f"{presence_cutoff}")
            else:
                keep.append(i)
        alive = [alive[i] for i in keep]
    report.kept = alive
    log.info("filter_concepts: %s", report.summary())
    if not alive:
        log.warning("filter_concepts: every concept was dropped; loosen the cut-offs")
    return alive, report


def _checked_inputs(concepts, class_names, duplicate_rule: str, presence_cutoff, image_embeddings, top_k: int):
    """Validated ``(unique concept names, class names, presence cut-off as a number or None)``."""
    names = list(concepts.names if isinstance(concepts, ConceptSet) else concepts)
    bad = [i for i, c in enumerate(names) if not isinstance(c, str)]
    if bad:
        raise InvalidArgument(f"concepts must be strings; entry {bad[0]} is {type(names[bad[0]]).__name__}")
    if duplicate_rule not in ("total_similarity", "later"):
        raise InvalidArgument(f"duplicate_rule must be 'total_similarity' or 'later', got {duplicate_rule!r}")
    if isinstance(presence_cutoff, str):
        presence_cutoff = presence_preset(presence_cutoff)
    unique = list(dict.fromkeys(names))  # the report is keyed by name: exact repeats go first (the first stays)
    if len(unique) < len(names):
        log.info("filter_concepts: removed %d exact repeat(s) before filtering", len(names) - len(unique))
        names = unique
    class_names = list(class_names)
    if any(not isinstance(c, str) for c in class_names):
        raise InvalidArgument("class_names must be strings")
    if presence_cutoff is not None:
        if image_embeddings is None:
            raise InvalidArgument("presence_cutoff needs image_embeddings [N, D]")
        if (not isinstance(image_embeddings, torch.Tensor) or image_embeddings.dim() != 2
                or image_embeddings.shape[0] == 0):
            got = (tuple(image_embeddings.shape) if isinstance(image_embeddings, torch.Tensor)
                   else type(image_embeddings).__name__)
            raise InvalidArgument(f"image_embeddings must have shape [N, D] with N >= 1, got {got}")
        if top_k < 1:
            raise InvalidArgument(f"top_k must be >= 1, got {top_k}")
    return names, class_names, presence_cutoff


def _drop_class_names(alive: list[str], class_names: list[str], report: FilterReport) -> list[str]:
    matches: dict[str, str] = {}
    for cls in class_names:
        for v in _class_variants(cls):
            matches.setdefault(v, cls)
    keep = []
    for c in alive:
        if c in matches:
            report.drop(c, "class_similarity", f"is the class name {matches[c]!r} (text match)")
        else:
            keep.append(c)
    return keep


class _Texts:
    """The surviving concepts with their unit text embeddings (and sentence-model embeddings, when used)."""

    def __init__(self, names: list[str], text_encoder, sentence_encoder, emb=None, sent=None) -> None:
        self.names, self.text_encoder, self.sentence_encoder = names, text_encoder, sentence_encoder
        if emb is None and names:
            emb = _encode(text_encoder, names, "concepts")
            sent = _encode(sentence_encoder, names, "concepts") if sentence_encoder is not None else None
        self.emb, self.sent = emb, sent

    def keep(self, idx: list[int]) -> _Texts:
        return _Texts([self.names[i] for i in idx], self.text_encoder, self.sentence_encoder, self.emb[idx],
                      self.sent[idx] if self.sent is not None else None)

    def similarity(self, other_emb: torch.Tensor, other_sent: torch.Tensor | None) -> torch.Tensor:
        """[n, K] similarity to other texts: label-free CBM's (mpnet + 3·CLIP)/4 with the sentence model, else CLIP."""
        sims = self.emb @ other_emb.T
        if self.sent is not None:
            sims = (self.sent.to(sims.device) @ other_sent.to(sims.device).T + 3 * sims) / 4
        return sims


def _drop_like_classes(texts: _Texts, class_names: list[str], cutoff: float, report: FilterReport) -> _Texts:
    cls_emb = _encode(texts.text_encoder, class_names, "class names").to(texts.emb.device)
    cls_sent = _encode(texts.sentence_encoder, class_names, "class names") if texts.sent is not None else None
    best, arg = texts.similarity(cls_emb, cls_sent).max(1)  # over [n, K]
    keep = []
    for i, c in enumerate(texts.names):
        if float(best[i]) >= cutoff:
            report.drop(c, "class_similarity", f"similarity {float(best[i]):.3f} >= {cutoff} to class "
                                               f"{class_names[int(arg[i])]!r}")
        else:
            keep.append(i)
    return texts.keep(keep)


def _drop_near_duplicates(texts: _Texts, cutoff: float, rule: str, report: FilterReport) -> _Texts:
    sims = texts.similarity(texts.emb, texts.sent).cpu()
    alive = texts.names
    deleted: set[int] = set()
    if rule == "total_similarity":
        # label-free CBM's loop: every pair (i, j), i ≠ j, in index order, while neither is deleted; the one with the
        # smaller row sum (total similarity to all concepts) goes — the more general concept stays
        total = sims.sum(1)
        for i, j in torch.nonzero(sims >= cutoff).tolist():
            if i == j or i in deleted or j in deleted:
                continue
            loser, winner = (i, j) if float(total[i]) < float(total[j]) else (j, i)
            deleted.add(loser)
            report.drop(alive[loser], "concept_similarity", f"similarity {float(sims[i, j]):.3f} >= {cutoff} to "
                                                            f"{alive[winner]!r}")
    else:  # greedy in list order, so the earlier of a pair survives
        keep_idx: list[int] = []
        for i, c in enumerate(alive):
            if keep_idx:
                v, j = sims[i, keep_idx].max(0)
                if float(v) >= cutoff:
                    deleted.add(i)
                    report.drop(c, "concept_similarity", f"similarity {float(v):.3f} >= {cutoff} to "
                                                         f"{alive[keep_idx[int(j)]]!r}")
                    continue
            keep_idx.append(i)
    return texts.keep([i for i in range(len(alive)) if i not in deleted])


# Cut-offs are cosine thresholds, so they belong to the text encoder they were calibrated on: label-free CBM's 0.85 /
# 0.9 are for CLIP ViT-B/16 (+ mpnet). A CLIP whose similarities live on another scale declares its own here; "auto"
# in ConceptFilterConfig resolves through this table, else to label-free CBM's values.
LABEL_FREE_CUTOFFS = {"class_sim_cutoff": 0.85, "concept_sim_cutoff": 0.9}
MODEL_CUTOFFS: dict[str, dict[str, float | None]] = {
    # The bundled testbed CLIP (a 1.6 M-parameter text tower over the testbed vocabulary): its classes are
    # conjunctions of two concepts ("white star"), and the tower places "star" 0.935, "cross" 0.865, "white" 0.861
    # from a class name, so the class stage would delete exactly the concepts the class rules use (measured: test
    # mIoU 0.356 < Grad-CAM's 0.360 with it, 0.374 without). Its concept-concept similarities peak at 0.887.
    "testbed": {"class_sim_cutoff": None, "concept_sim_cutoff": 0.9},
}


def resolve_cutoff(value: float | str | None, stage: str, clip_name: str | None) -> float | None:
    """A filter cut-off: a number or None as given; ``"auto"`` → the CLIP's calibrated value
    (:data:`MODEL_CUTOFFS`), else label-free CBM's (:data:`LABEL_FREE_CUTOFFS`)."""
    if value != "auto":
        return value
    return MODEL_CUTOFFS.get(clip_name or "", LABEL_FREE_CUTOFFS).get(stage, LABEL_FREE_CUTOFFS[stage])


# Label-free CBM's presence cut-off (``clip_cutoff``) per dataset, on CLIP ViT-B/16-style cosine similarities.
PRESENCE_CUTOFFS = {"default": 0.25, "cifar10": 0.25, "cifar100": 0.25, "cub": 0.26, "places365": 0.28,
                    "imagenet": 0.28}


def presence_preset(name: str) -> float:
    """The presence cut-off of a named preset (:data:`PRESENCE_CUTOFFS`)."""
    key = name.strip().lower()
    if key not in PRESENCE_CUTOFFS:
        raise InvalidArgument(f"unknown presence cut-off preset {name!r}; presets: {sorted(PRESENCE_CUTOFFS)} "
                              "(or give a number)")
    return PRESENCE_CUTOFFS[key]


def _class_variants(cls: str) -> set[str]:
    """The spellings label-free CBM removes as plain text matches of a class name."""
    out = {prefix + cls for prefix in ("", "a ", "A ", "an ", "An ", "the ", "The ")}
    out.add(cls.upper())
    if cls:
        out.add(cls[0].upper() + cls[1:])
    return out


_SENTENCE_NOTE_SHOWN = False


def load_sentence_encoder(name: str = "all-mpnet-base-v2", device: str | torch.device = "cpu"
                          ) -> Callable[[list[str]], torch.Tensor] | None:
    """Label-free CBM's sentence model for concept similarity, or None (then CLIP alone is used; said once).

    Used only when ``sentence-transformers`` is installed and the weights are already on this machine (no download
    is attempted: the loader runs with ``local_files_only``)."""
    global _SENTENCE_NOTE_SHOWN
    try:
        from sentence_transformers import SentenceTransformer

        from fastcbm.compat import quiet_downloads

        with quiet_downloads():
            model = SentenceTransformer(name, device=str(device), local_files_only=True)
    except Exception as exc:  # not installed, weights not local, or an incompatible version
        if not _SENTENCE_NOTE_SHOWN:
            _SENTENCE_NOTE_SHOWN = True
            why = "not installed" if isinstance(exc, ImportError) else "weights not on this machine"
            log.warning("concept filter: similarities use CLIP alone (label-free CBM averages them with %s, which is "
                        "%s: pip install sentence-transformers and download %s once for its exact filter)",
                        name, why, name)
        return None

    def encode(texts: list[str]) -> torch.Tensor:
        return torch.as_tensor(model.encode(list(texts), convert_to_numpy=True, show_progress_bar=False))

    return encode
