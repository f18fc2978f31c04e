"""Concept lists, method-agnostic: SALF-CBM, CE-FAM and DEAL all start from a :class:`ConceptSet` and unit text
embeddings ``[M, D]``.

- :mod:`fastcbm.concepts.load`: files → :class:`ConceptSet` (text, one per line, or JSON ``{class: [concepts]}``);
- :mod:`fastcbm.concepts.filter`: label-free CBM's filter and its cut-offs;
- :mod:`fastcbm.concepts.encode`: concepts → unit text embeddings.
"""

from __future__ import annotations

from fastcbm.concepts.encode import encode_texts, tokenize_checked
from fastcbm.concepts.filter import (
    LABEL_FREE_CUTOFFS,
    MODEL_CUTOFFS,
    PRESENCE_CUTOFFS,
    FilterReport,
    filter_concepts,
    load_sentence_encoder,
    presence_preset,
    resolve_cutoff,
)
from fastcbm.concepts.load import ConceptSet, concepts_from_mapping, load_concept_mapping, load_concepts

__all__ = ["ConceptSet", "FilterReport", "LABEL_FREE_CUTOFFS", "MODEL_CUTOFFS", "PRESENCE_CUTOFFS",
           "concepts_from_mapping", "encode_texts", "filter_concepts", "load_concept_mapping", "load_concepts",
           "load_sentence_encoder", "presence_preset", "resolve_cutoff", "tokenize_checked"]
