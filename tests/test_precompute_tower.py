"""Precompute's image tower (fastcbm/precompute/tower.py): the ring kernel renders each chunk straight into the
tower's reused input buffer in the encoder's dtype; eager, compiled and CUDA-graph towers compute the same embeddings
as rendering the batch and encoding it whole."""

from __future__ import annotations

import pytest
import torch

from fastcbm.errors import InvalidArgument
from fastcbm.precompute.tower import PromptTower
from fastcbm.prompts import render_rings
from tests.conftest import HAS_CUDA, assert_close

RING = dict(grid=(2, 3), radius=5.0, width=2.0, include_plain=True)  # 1 + 6 copies of 32 px images


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    from fastcbm.compat import import_open_clip

    oc = import_open_clip()
    torch.manual_seed(seed)
    return oc.model.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                         text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=2)).eval()


def _tower(model, mode="eager", device="cpu", dtype=torch.float32, max_encode_batch=15, calls=None):
    def render(images, out):
        if calls is not None:
            calls.append((images.shape[0], out.data_ptr()))
        return render_rings(images, out_dtype=dtype, out=out, **RING)

    return PromptTower(model.to(device), render, copies=7, size=32, device=torch.device(device), dtype=dtype,
                       max_encode_batch=max_encode_batch, mode=mode)


def _whole_batch(model, images, dtype=torch.float32):
    """The definition: every copy of the batch rendered at once, then one encoder call."""
    x = render_rings(images, out_dtype=dtype, **RING)
    autocast = images.device.type == "cuda" and dtype != torch.float32
    with torch.inference_mode(), torch.autocast(images.device.type, dtype=dtype, enabled=autocast):
        return model.encode_image(x.reshape(-1, 3, 32, 32)).float().reshape(images.shape[0], 7, -1)


def _images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("b", [1, 2, 5])
def test_eager_tower_renders_into_one_reused_buffer(b):
    model, calls = tiny_clip(), []
    tower = _tower(model, calls=calls)  # 15 rows -> 2 whole images (14 rows) per chunk
    images = _images(b)
    got = tower(images)
    assert got.shape == (b, 7, 32) and got.dtype == torch.float32
    assert_close(got, _whole_batch(model, images), atol=1e-5, rtol=1e-5, what="eager tower vs whole batch")
    assert [n for n, _ in calls] == [min(2, b - lo) for lo in range(0, b, 2)]
    assert len({ptr for _, ptr in calls}) == 1, "every chunk must be rendered into the same input buffer"
    tower(_images(b, seed=1))
    assert len({ptr for _, ptr in calls}) == 1, "the buffer is reused across batches"


def test_a_chunk_is_at_least_one_image():
    tower = _tower(tiny_clip(), max_encode_batch=3)  # fewer rows than one image's 7 copies
    assert tower.per_chunk == 1
    assert tower(_images(2)).shape == (2, 7, 32)


def test_modes_are_checked():
    with pytest.raises(InvalidArgument, match="tower must be one of"):
        _tower(tiny_clip(), mode="fast")
    with pytest.raises(InvalidArgument, match="needs a CUDA device"):
        _tower(tiny_clip(), mode="graph")


@pytest.mark.slow
def test_compiled_tower_matches_eager():
    """torch.compile (inductor, C++ on CPU): ~30-60 s to compile on 2 cores."""
    model = tiny_clip()
    images = _images(5)
    want = _tower(model)(images)
    assert_close(_tower(model, mode="compile")(images), want, atol=1e-4, rtol=1e-4, what="compiled tower")


def test_precompute_takes_the_tower_option(tmp_path):
    from fastcbm.precompute import precompute

    with pytest.raises(InvalidArgument, match="tower"):
        precompute([], tiny_clip(), tmp_path / "c", tower="graph", device="cpu", progress=False, model_name="x")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_gpu_towers_match_eager_bf16(mode):
    model = tiny_clip().cuda()
    images = _images(9).cuda()
    want = _tower(model, device="cuda", dtype=torch.bfloat16)(images)
    assert_close(want, _whole_batch(model, images, torch.bfloat16), atol=2e-2, rtol=2e-2, what="eager bf16")
    tower = _tower(model, mode=mode, device="cuda", dtype=torch.bfloat16)
    for seed in range(2):  # replays / recompiles on new data, and the eager short last chunk
        imgs = _images(9, seed=seed).cuda()
        ref = _tower(model, device="cuda", dtype=torch.bfloat16)(imgs)
        assert_close(tower(imgs), ref, atol=1e-2, rtol=1e-2, what=f"{mode} tower")


@pytest.mark.gpu
def test_gpu_attention_runs_through_fused_sdpa():
    """On a GPU the tower's attention must reach a fused SDPA kernel (flash / memory-efficient / cuDNN)."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_clip().cuda()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _tower(model, device="cuda", dtype=torch.bfloat16)(_images(4).cuda())
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    assert any(k in names for k in ("flash", "efficient_attention", "cudnn_attention", "fmha")), names[:2000]


def test_reports_gpu_skip():
    if not HAS_CUDA:
        pytest.skip("the graph / compiled / fused-attention checks need a GPU")
