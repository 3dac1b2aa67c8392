"""Counting multiply-accumulates: in-place and fused products are counted, and the fused model's count."""

from __future__ import annotations

import torch

from dist_video import DiSTConfig, DiSTVideoModel
from dist_video.profiling import cost_per_view, count_macs, inference_cost_per_view


def test_in_place_matrix_products_are_counted():
    a, b, c = torch.randn(6, 5), torch.randn(5, 7), torch.randn(6, 7)
    batch = torch.randn(3, 6, 5), torch.randn(3, 5, 7), torch.randn(3, 6, 7)
    assert count_macs(lambda: torch.addmm(c, a, b)) == 6 * 5 * 7
    assert count_macs(lambda: c.clone().addmm_(a, b)) == 6 * 5 * 7
    assert count_macs(lambda: batch[2].clone().baddbmm_(batch[0], batch[1])) == 3 * 6 * 5 * 7


def test_inference_count_matches_the_architecture_for_clip_and_is_lower_for_the_branch(tiny_clip):
    clip = tiny_clip(width=64, layers=3)
    model = DiSTVideoModel(clip, DiSTConfig(num_frames=4, alpha=2, temporal_dim=8, integration_dim=64,
                                            pooling_layers=2), clip_dtype="fp32")
    flags = [p.requires_grad for p in model.parameters()]
    architecture = cost_per_view(model, 64, 64)
    executed = inference_cost_per_view(model, 64, 64)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
    assert executed["clip"] == architecture["clip"] > 0
    # The pooling layers' keys and values (2 layers x 2 frames x 17 tokens x 64 x 128) are not formed;
    # the queries' products with the normalised tokens take their place.
    assert 0 < executed["branch"] < architecture["branch"] - 2 * 2 * 17 * 64 * 128 // 2


def test_fused_convolutions_are_counted_like_plain_ones():
    import pytest
    import torch.nn.functional as F
    from dist_video.fused import onednn_fusion_available

    if not onednn_fusion_available("cpu", torch.float32):
        pytest.skip("oneDNN's fused convolutions do not run on this build or CPU")
    fused = torch.ops.mkldnn._convolution_pointwise
    x = torch.randn(1, 8, 6, 5, 4).contiguous(memory_format=torch.channels_last_3d)
    w1, w2, b = torch.randn(8, 8, 3, 1, 1), torch.randn(8, 8, 1, 3, 3), torch.randn(8)
    with torch.no_grad():
        plain = count_macs(lambda: F.conv3d(x, w1, b, padding=(1, 0, 0)))
        assert plain == 8 * 6 * 5 * 4 * 8 * 3
        assert count_macs(lambda: fused(x, w1, b, [1, 0, 0], [1, 1, 1], [1, 1, 1], 1, "swish", [], "")) == plain
        assert count_macs(lambda: fused.binary(x, x, w2, b, [0, 1, 1], [1, 1, 1], [1, 1, 1], 1, "add", 1.0, None, [],
                                               "")) == count_macs(lambda: F.conv3d(x, w2, b, padding=(0, 1, 1)))
