"""The temporal stem computes each time tap of all clips in one matrix product (issue 25): the
same result, forward and backward, as the per-clip loop it replaces (kept here as the reference)
and as ``nn.Conv3d``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_video.dist import PatchStem


def per_clip_loop(stem: PatchStem, video: torch.Tensor) -> torch.Tensor:
    """PatchStem.forward before the batching: one small matrix product per clip and tap, stacked."""
    b, c, t, h, w = video.shape
    k, p = stem.kernel_size[0], stem.kernel_size[1]
    g1, g2 = h // p, w // p
    dtype = stem.weight.dtype
    patches = video.new_empty(b, t + k - 1, g1 * g2, c * p * p, dtype=dtype)
    patches[:, :k // 2].zero_()
    patches[:, k // 2 + t:].zero_()
    src = video[..., :g1 * p, :g2 * p].unflatten(4, (g2, p)).unflatten(3, (g1, p))
    patches[:, k // 2:k // 2 + t].view(b, t, g1, g2, c, p, p).copy_(src.permute(0, 2, 3, 5, 1, 4, 6))
    weight = stem.weight.permute(2, 0, 1, 3, 4).reshape(k, stem.out_channels, c * p * p)
    rows = t * g1 * g2
    outs = []
    for clip in patches:
        y = F.linear(clip[0:t].view(rows, -1), weight[0], stem.bias)
        for dt in range(1, k):
            y = torch.addmm(y, clip[dt:dt + t].view(rows, -1), weight[dt].t())
        outs.append(y)
    y = torch.stack(outs)
    return y.view(b, t, g1, g2, stem.out_channels).permute(0, 4, 1, 2, 3)


def _forward_backward(stem, video, fn, grad_out=None):
    stem.zero_grad(set_to_none=True)
    video = video.detach().clone().requires_grad_(True)
    y = fn(stem, video)
    if grad_out is None:
        torch.manual_seed(1)
        grad_out = torch.randn_like(y)
    y.backward(grad_out)
    return y.detach(), video.grad, stem.weight.grad.clone(), stem.bias.grad.clone(), grad_out


@pytest.mark.parametrize("batch, frames, kernel, size, patch", [(3, 8, 5, 64, 16), (1, 4, 3, 40, 8),
                                                                  (2, 6, 1, 32, 16), (4, 2, 5, 33, 16)])
def test_batched_stem_equals_the_per_clip_loop_forward_and_backward(batch, frames, kernel, size, patch):
    torch.manual_seed(0)
    stem = PatchStem(24, patch, kernel).double()
    video = torch.randn(batch, 3, frames, size, size + 8, dtype=torch.float64)
    y, gv, gw, gb, grad_out = _forward_backward(stem, video, lambda s, v: s(v))
    y0, gv0, gw0, gb0, _ = _forward_backward(stem, video, per_clip_loop, grad_out)
    assert y.shape == y0.shape and y.stride() == y0.stride()  # the same layout for the blocks after it
    for a, b in ((y, y0), (gv, gv0), (gw, gw0), (gb, gb0)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # and both are the 3D convolution they stand for
    conv = F.conv3d(video, stem.weight, stem.bias, stride=(1, patch, patch), padding=(kernel // 2, 0, 0))
    torch.testing.assert_close(y, conv, rtol=1e-12, atol=1e-12)


def test_batched_stem_follows_autocast():
    torch.manual_seed(0)
    stem = PatchStem(16, 16, 3)
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = stem(video)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), stem(video), rtol=0.05, atol=0.05)
