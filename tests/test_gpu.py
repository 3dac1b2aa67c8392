"""On a CUDA GPU (marker ``gpu``): the model computes there what it computes on the CPU."""

from __future__ import annotations

import pytest
import torch

import dist_video


@pytest.mark.gpu
def test_dist_on_cuda_matches_the_cpu_in_float32():
    clip = dist_video.load_clip("builtin:digits")
    torch.manual_seed(0)
    model = dist_video.DiSTVideoModel(clip, dist_video.DiSTConfig(num_frames=8, alpha=2, temporal_dim=32,
                                                                  integration_dim=128), clip_dtype=torch.float32)
    model.set_linear_head(3).eval()
    video = torch.randn(2, 3, 8, 48, 48)
    with torch.no_grad():
        on_cpu = model(video)
        on_gpu = model.to("cuda")(video.to("cuda")).cpu()
        fused = model.fuse(dtype=torch.float32)(video.to("cuda")).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fused, on_cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_search_takes_a_query_from_a_model_on_the_gpu():
    from dist_video.engine.embed import EmbeddingIndex, search_embeddings

    index = EmbeddingIndex(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), [("a.mp4", None, None), ("b.mp4", None, None)])
    hits = search_embeddings(index, torch.tensor([0.1, 1.0], device="cuda"), topk=1)
    assert hits[0]["video"] == "b.mp4"
