"""CLIP work shared between overlapping windows: each sparse frame through the frozen CLIP once.

A fused DiST model splits into work per sparse frame and work per window. The frozen CLIP sees
each sparse frame on its own (:meth:`~dist_video.fused.FusedDiSTModel.clip_layers`: the token
sequences of the selected blocks, ``{layer: (N+1) x D}`` per frame), while the DiST branch
(:attr:`~dist_video.fused.FusedDiSTModel.branch`) reads a whole window: its T dense frames (the
temporal stem) and its T' = T / alpha sparse frames' CLIP taps. A frame-averaging model
(:class:`~dist_video.fused.FusedFrameModel` without adapters) is all per-frame work: the final
CLIP embedding of each sparse frame, averaged per window.

:class:`SharedFrames` keeps the per-frame outputs by the frame's index in the video (its *key*),
computes only the keys it has not seen, and drops the ones the caller says are no longer
needed (:meth:`SharedFrames.forget`), so it holds at most the sparse frames of the windows in
progress. Windows whose frames are on one grid (:mod:`dist_video.engine.timeline`) then cost one
CLIP forward per grid frame instead of one per frame per window. The outputs are those of the
model run on each window's clip on its own, up to float rounding (the CLIP batch differs).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..fused import FusedDiSTModel, FusedFrameModel, average_frames

__all__ = ["SharedFrames", "shared_frames"]


def shared_frames(model, normalize: Callable[[torch.Tensor], torch.Tensor],
                  then: Callable[[torch.Tensor], torch.Tensor] | None = None) -> "SharedFrames | None":
    """A :class:`SharedFrames` for ``model`` when its CLIP work is per frame (a fused DiST model,
    or a fused frame-averaging model without adapters), else ``None`` (e.g. an ONNX runner: run
    it per window). ``normalize``: uint8 ``B x 3 x T x S x S`` -> float (the test transform's);
    ``then``: applied to the B x E video embeddings (e.g. the head and a softmax)."""
    if isinstance(model, FusedDiSTModel) or (isinstance(model, FusedFrameModel) and model.adapters is None):
        return SharedFrames(model, normalize, then)
    return None


class SharedFrames:
    """Per-frame CLIP outputs of a fused model, computed once per key and reused by every window
    (see the module docstring). ``clip_frames`` counts the frames run through CLIP."""

    def __init__(self, model, normalize: Callable[[torch.Tensor], torch.Tensor],
                 then: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self.alpha = model.alpha
        self.normalize = normalize
        self.then = then or (lambda z: z)
        self.dense = isinstance(model, FusedDiSTModel)  # the branch reads the dense frames too
        self.cache: dict[int, dict[int, torch.Tensor] | torch.Tensor] = {}
        self.clip_frames = 0

    def __len__(self) -> int:
        return len(self.cache)

    def forget(self, keys) -> None:
        """Drop the outputs of ``keys`` (frames no later window needs); unknown keys are ignored."""
        for key in keys:
            self.cache.pop(key, None)

    def forget_before(self, key: int) -> None:
        """Drop the outputs of every key below ``key`` (for windows that only move forward)."""
        self.forget([k for k in self.cache if k < key])

    def _run_clip(self, images: torch.Tensor) -> list:
        """uint8 N x 3 x S x S -> per frame ``{layer: (N+1) x D}`` (DiST) or ``E`` (frame model)."""
        model = self.model
        x = self.normalize(images.transpose(0, 1)[None])[0].transpose(0, 1).to(model.dtype)  # N x 3 x S x S
        self.clip_frames += x.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            if self.dense:
                layers = model.clip.forward_layers(x, model.selected_layers)
                return [{i: t[j] for i, t in layers.items()} for j in range(x.shape[0])]
            return list(model.clip(x).unbind(0))

    def outputs(self, windows: Sequence[tuple[Sequence[int], torch.Tensor]]) -> torch.Tensor:
        """``then`` of the video embeddings of ``windows``: each ``(keys, clip)``, the T dense
        frames' keys and the window's uint8 clip 3 x T x S x S (on the model's device). Frames
        not in the cache go through CLIP together, once each. -> B x ..."""
        keys = [list(k)[::self.alpha] for k, _ in windows]
        new: dict[int, torch.Tensor] = {}
        for (_, clip), sparse in zip(windows, keys):
            for slot, key in enumerate(sparse):
                if key not in self.cache and key not in new:
                    new[key] = clip[:, slot * self.alpha]
        if new:
            self.cache.update(zip(new, self._run_clip(torch.stack(list(new.values())))))
        b, model = len(windows), self.model
        with torch.autocast(windows[0][1].device.type, enabled=False):
            if self.dense:
                video = self.normalize(torch.stack([clip for _, clip in windows]))
                layers = {i: torch.stack([self.cache[k][i] for sparse in keys for k in sparse])
                          for i in model.selected_layers}
                z = model.branch(video, layers).to(model.output_dtype)
            else:
                z = average_frames(torch.stack([self.cache[k] for sparse in keys for k in sparse]), b)
                z = z.to(model.output_dtype)
        return self.then(z)
