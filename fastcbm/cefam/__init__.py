"""CE-FAM (concept explanation via fusion of activation maps): a translator from a classifier's pooled stages into
CLIP space, concept regions by Grad-CAM of concept scores, association and contribution scores, evaluation."""

from fastcbm.cefam.association import association_scores, channel_ranking, concept_contributions
from fastcbm.cefam.regions import ConceptGrads, concept_grads, concept_regions
from fastcbm.cefam.model import CEFAM, CEFAMConfig, load_cefam
from fastcbm.cefam.train import TranslatorConfig, train_translator
from fastcbm.cefam.translator import Translator, concept_scores, pool_stages, stage_activations

__all__ = ["Translator", "concept_scores", "pool_stages", "stage_activations"]
__all__ += ["CEFAM", "CEFAMConfig", "load_cefam", "TranslatorConfig", "train_translator"]
__all__ += ["concept_regions", "concept_grads", "ConceptGrads"]
__all__ += ["association_scores", "concept_contributions", "channel_ranking"]
