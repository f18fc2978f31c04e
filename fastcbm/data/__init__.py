"""Data: the deterministic synthetic testbed (:mod:`fastcbm.data.synthetic`) and its ImageFolder export."""

from fastcbm.data.synthetic import (TESTBED_IMAGE_SIZE, TRAINING_SEED_LIMIT, SceneBatch, SceneObject, class_names,
                                    class_rules, draw_ring, generate, vocabulary)

__all__ = ["TESTBED_IMAGE_SIZE", "TRAINING_SEED_LIMIT", "SceneBatch", "SceneObject", "class_names", "class_rules",
           "draw_ring", "generate", "vocabulary"]
