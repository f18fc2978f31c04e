"""Concept lists: loading, filtering (with a deterministic fake text encoder), text encoding."""

from __future__ import annotations

import hashlib
import json
import logging
import re

import pytest
import torch

from fastcbm.concepts import (
    ConceptSet,
    concepts_from_mapping,
    encode_texts,
    filter_concepts,
    load_concept_mapping,
    load_concepts,
)

DIM = 256


def _word_vec(word: str) -> torch.Tensor:
    # A fixed pseudo-random unit vector per word (sha256-seeded): distinct words are nearly orthogonal.
    seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
    return torch.randn(DIM, generator=torch.Generator().manual_seed(seed))


def bag_of_words(texts: list[str]) -> torch.Tensor:
    """Deterministic fake text encoder: the normalised sum of word vectors, so cosine ≈ word overlap."""
    out = torch.stack([sum((_word_vec(w) for w in re.findall(r"\w+", t.lower())), torch.zeros(DIM)) for t in texts])
    return torch.nn.functional.normalize(out, dim=1)


# ------------------------------------------------------------------------------------------------------------ loading
def test_load_text(tmp_path, caplog):
    p = tmp_path / "c.txt"
    p.write_text("# my concepts\n  red stripes \n\nfur\nFur\n# fur again\nwhiskers\r\nRED STRIPES\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="fastcbm.concepts"):
        cs = load_concepts(p)
    assert cs.names == ["red stripes", "fur", "whiskers"]
    assert cs.class_to_concepts is None and cs.source == str(p) and len(cs) == 3
    assert "dropped 2 duplicate" in caplog.text


def test_load_json_mapping_union(tmp_path, caplog):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"cat": ["whiskers", "fur", " ", "Fur"], "tiger": ["stripes", "FUR", "whiskers"],
                             "empty": []}), encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="fastcbm.concepts"):
        cs = load_concepts(p)
    assert cs.names == ["whiskers", "fur", "stripes"]
    assert cs.class_to_concepts == {"cat": ["whiskers", "fur"], "tiger": ["stripes", "fur", "whiskers"], "empty": []}
    assert "dropped 3 duplicate" in caplog.text
    # save → load round trip, both formats
    cs.save(tmp_path / "back.json")
    assert load_concepts(tmp_path / "back.json").class_to_concepts == cs.class_to_concepts
    cs.save(tmp_path / "back.txt")
    assert load_concepts(tmp_path / "back.txt").names == cs.names
    sub = cs.subset(["stripes", "fur"])
    assert sub.names == ["fur", "stripes"] and sub.class_to_concepts["cat"] == ["fur"]


def test_load_json_list(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('["a", "b", "A"]', encoding="utf-8")
    cs = load_concepts(p)
    assert cs.names == ["a", "b"] and cs.class_to_concepts is None


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("bad.json", '{"cat": ["fur",\n  "whiskers"', r"line 2, column"),
        ("bad.json", '{"cat": ["fur", 3]}', r"entry 1 is int"),
        ("bad.json", '{"cat": "fur"}', r"must map to a list"),
        ("bad.json", '"fur"', r"JSON object"),
        ("bad.json", '{"cat": [], "dog": ["  "]}', r"empty"),
        ("empty.txt", "# only a comment\n\n   \n", r"empty"),
    ],
)
def test_load_errors(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as info:
        load_concepts(p)
    assert str(p) in str(info.value)


def test_load_missing_binary_and_bom(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_concepts(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"fur\n\xff\xfe\x00oops\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_concepts(tmp_path / "bin.txt")
    (tmp_path / "bom.txt").write_bytes("\ufefffur\nwhiskers\n".encode("utf-8"))
    assert load_concepts(tmp_path / "bom.txt").names == ["fur", "whiskers"]


# ---------------------------------------------------------------------------------------------------------- filtering
def test_fake_encoder_is_sane():
    e = bag_of_words(["striped fur", "striped fur", "fur", "engine"])
    assert torch.allclose(e.norm(dim=1), torch.ones(4))
    assert e[0] @ e[1] > 0.999 and 0.5 < e[0] @ e[2] < 0.9 and abs(e[0] @ e[3]) < 0.3


def test_filter_stages_in_order():
    concepts = [
        "a very long concept description that goes on",  # length
        "tiger",  # same as a class name
        "striped fur",
        "Striped fur",  # near duplicate of the previous (later one dropped)
        "whiskers",
        "engine",
        "striped fur pattern",  # 0.82 similar to "striped fur": kept at cut-off 0.9
    ]
    kept, report = filter_concepts(concepts, ["tiger", "car"], bag_of_words)
    assert kept == ["striped fur", "whiskers", "engine", "striped fur pattern"]
    assert report.kept == kept
    assert report.dropped[concepts[0]][0] == "length" and "> 30" in report.dropped[concepts[0]][1]
    assert report.dropped["tiger"][0] == "class_similarity" and "'tiger'" in report.dropped["tiger"][1]
    assert report.dropped["Striped fur"] == ("concept_similarity", report.dropped["Striped fur"][1])
    assert "'striped fur'" in report.dropped["Striped fur"][1]
    assert report.count("length") == 1 and "kept 4 of 7" in report.summary()


def test_filter_cutoffs_configurable_and_switchable():
    concepts = ["striped fur", "striped fur pattern", "tiger stripes"]
    kept, rep = filter_concepts(concepts, ["tiger"], bag_of_words, concept_sim_cutoff=0.8, class_sim_cutoff=0.6)
    assert kept == ["striped fur"]
    assert rep.dropped["tiger stripes"][0] == "class_similarity"  # class stage runs before the pairwise one
    assert rep.dropped["striped fur pattern"][0] == "concept_similarity"
    kept, rep = filter_concepts(concepts, ["tiger"], bag_of_words, max_length=None, class_sim_cutoff=None,
                                concept_sim_cutoff=None)
    assert kept == concepts and not rep.dropped
    kept, rep = filter_concepts(concepts, ["tiger"], bag_of_words, max_length=5)
    assert kept == [] and rep.count("length") == 3


def test_filter_presence_top_k():
    concepts = ["whiskers", "engine", "fur"]
    text = bag_of_words(concepts)
    # 40 images: 3 look like "whiskers" (top-5 mean 0.6), "fur" appears strongly in 5, "engine" never.
    imgs = torch.nn.functional.normalize(torch.randn(40, DIM, generator=torch.Generator().manual_seed(0)), dim=1) * 0.2
    imgs[:3] += text[0] * 1.0
    imgs[10:15] += text[2] * 1.0
    imgs = torch.nn.functional.normalize(imgs, dim=1)
    sims = imgs @ text.T
    top5 = sims.topk(5, dim=0).values.mean(0)
    cutoff = float((top5[0] + top5[2]) / 2)
    assert top5[2] > cutoff > top5[0] > top5[1]
    kept, rep = filter_concepts(concepts, [], bag_of_words, image_embeddings=imgs, presence_cutoff=cutoff)
    assert kept == ["fur"]
    assert rep.dropped["engine"][0] == rep.dropped["whiskers"][0] == "presence"
    assert "top-5" in rep.dropped["engine"][1]
    # top_k = 3: the 3 whisker images suffice; chunked streaming equals the dense computation
    top3 = sims.topk(3, dim=0).values.mean(0)
    kept, _ = filter_concepts(concepts, [], bag_of_words, image_embeddings=imgs, presence_cutoff=float(top3[0]) - 1e-4,
                              top_k=3)
    assert "whiskers" in kept and "engine" not in kept
    from fastcbm.concepts.filter import _presence

    assert torch.allclose(_presence(imgs, text, 5, chunk=7), top5, atol=1e-6)
    assert torch.allclose(_presence(imgs[:2], text, 5), sims[:2].mean(0), atol=1e-6)  # fewer images than k


def test_filter_errors_and_concept_set_input():
    cs = ConceptSet(["fur", "whiskers"])
    kept, _ = filter_concepts(cs, ["cat"], bag_of_words)
    assert kept == ["fur", "whiskers"]
    kept, rep = filter_concepts(["fur", "whiskers", "fur"], ["cat"], bag_of_words)  # exact repeat
    assert kept == ["fur", "whiskers"] and "fur" not in rep.dropped
    with pytest.raises(ValueError, match="image_embeddings"):
        filter_concepts(cs, ["cat"], bag_of_words, presence_cutoff=0.2)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        filter_concepts(cs, ["cat"], bag_of_words, presence_cutoff=0.2, image_embeddings=torch.zeros(0, DIM))
    with pytest.raises(ValueError, match="D=3"):
        filter_concepts(cs, ["cat"], bag_of_words, presence_cutoff=0.2, image_embeddings=torch.ones(4, 3))
    with pytest.raises(ValueError, match="entry 1"):
        filter_concepts(["fur", 3], ["cat"], bag_of_words)
    with pytest.raises(ValueError, match=r"\[2, D\]"):
        filter_concepts(cs, ["cat"], lambda texts: torch.zeros(len(texts) + 1, 4))


# ----------------------------------------------------------------------------------------------------------- encoding
class _FakeTokenizer:
    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(len(texts))
        ids = [[int(hashlib.md5(w.encode()).hexdigest(), 16) % 50 + 1 for w in t.split()][:8] for t in texts]
        return torch.tensor([row + [0] * (8 - len(row)) for row in ids])


class _FakeCLIP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(51, 16, padding_idx=0)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.emb(tokens).sum(1) * 3.0  # deliberately not unit norm


@pytest.mark.parametrize("batch_size", [1, 2, 256])
def test_encode_texts(batch_size):
    torch.manual_seed(0)
    model, tok = _FakeCLIP(), _FakeTokenizer()
    texts = ["red fur", "long whiskers", "engine"]
    templates = ("a photo of {}", "{} in the wild")
    out = encode_texts(model, tok, texts, templates, batch_size=batch_size, progress=False)
    assert out.shape == (3, 16) and out.dtype == torch.float32 and not out.requires_grad
    assert torch.allclose(out.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        per = [torch.nn.functional.normalize(model.encode_text(_FakeTokenizer()([t.format(x) for x in texts])), dim=1)
               for t in templates]
    expected = torch.nn.functional.normalize(per[0] + per[1], dim=1)
    assert torch.allclose(out, expected, atol=1e-6)
    assert max(tok.calls) <= batch_size and sum(tok.calls) == 6


def test_encode_texts_errors():
    model, tok = _FakeCLIP(), _FakeTokenizer()
    with pytest.raises(ValueError, match="templates"):
        encode_texts(model, tok, ["a"], templates=("no slot",), progress=False)
    with pytest.raises(ValueError, match="empty"):
        encode_texts(model, tok, [], progress=False)
    with pytest.raises(ValueError, match="encode_text"):
        encode_texts(object(), tok, ["a"], progress=False)


def test_encode_texts_grad_and_length_check():
    model, tok = _FakeCLIP(), _FakeTokenizer()
    out = encode_texts(model, tok, ["red fur", "engine"], progress=False, grad=True)
    assert out.requires_grad  # DEAL trains the text tower through its captions
    out.sum().backward()
    assert model.emb.weight.grad is not None and model.emb.weight.grad.abs().sum() > 0
    assert not encode_texts(model, tok, ["red fur"], progress=False).requires_grad


# ----------------------------------------------------------------------------------------------- class → concepts JSON
def test_concept_mapping_is_one_loader_for_every_method(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"cat": [" ears", "Fur", "fur", ""], "dog": ["fur"], "fish": []}))
    assert load_concept_mapping(p) == {"cat": ["ears", "Fur"], "dog": ["fur"], "fish": []}
    assert load_concepts(p).names == ["ears", "Fur"]  # the union, case-insensitively unique
    assert concepts_from_mapping({"x": ["y"]}).names == ["y"]


@pytest.mark.parametrize("content,match", [
    ('["a", "b"]', r"expected a JSON object \{class: \[concepts\]\}.*got a JSON list"),
    ("{}", "got an empty object"),
    ('{"cat": [1, null, "circle"]}', r"class 'cat', entry 0 is int \(1\), not a string"),
    ('{"cat": "ears"}', "must map to a list of strings"),
    ("{", "invalid JSON at line 1"),
])
def test_concept_mapping_refuses_what_is_not_class_to_strings(tmp_path, content, match):
    p = tmp_path / "c.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_concept_mapping(p)
    assert str(p) in str(info.value)
