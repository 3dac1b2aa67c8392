"""One model shared by the requests' threads: their clips run as batches on one worker thread."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from ..data.decoding import Cancelled

__all__ = ["BatchingModel", "LabelledModel"]

#: How often a waiting call looks at its cancel flag.
CANCEL_POLL_SECONDS = 0.05


class BatchingModel:
    """One model shared by many threads: each call ``model(video)`` (B_i x 3 x T x H x W) waits
    in a queue; one worker thread runs all the calls waiting at once as one batch (up to
    ``max_batch`` clips, calls of the same clip shape), and hands each caller its rows of the
    logits. It has the same interface as the model (``class_names``, ``num_classes``, ``config``).

    ``model(video, head)``: that call's logits through its own class head (a fused model's
    :meth:`~dist_video.fused.FusedDiSTModel.text_head`). For a model with ``classify`` (the
    fused forms), the batch goes through ``encode_video`` once, whatever heads its calls have,
    and each call's rows through its head (or the model's own); the model is never changed."""

    def __init__(self, model, max_batch: int = 16):
        self.model = model
        self.max_batch = max_batch
        self.class_names = model.class_names
        self.num_classes = model.num_classes
        self.config = model.config
        buffers = getattr(model, "buffers", None)
        self.device = next(buffers()).device if callable(buffers) else torch.device("cpu")
        self.separate_heads = all(callable(getattr(model, name, None)) for name in ("encode_video", "classify"))
        self.batches_run = 0
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="dist-video-model", daemon=True)
        self._thread.start()

    def __call__(self, video: torch.Tensor, head=None, cancel: threading.Event | None = None) -> torch.Tensor:
        """The logits of ``video``; a call whose ``cancel`` is set while it waits is dropped
        from the queue and raises :class:`~dist_video.data.decoding.Cancelled`."""
        if head is not None and not self.separate_heads:
            raise ValueError("this model cannot take another class head (it has no classify method)")
        if video.dim() == 4:
            video = video.unsqueeze(0)
        done: Future = Future()
        self._jobs.put((video, head, done))
        while cancel is not None:
            try:
                return done.result(timeout=CANCEL_POLL_SECONDS)
            except FutureTimeout:
                if cancel.is_set() and done.cancel():  # still waiting: the worker will skip it
                    raise Cancelled("cancelled while waiting for the model") from None
        return done.result()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _take(self) -> list | None:
        """The next job and every other job already waiting, up to ``max_batch`` clips."""
        first = self._jobs.get()
        if first is None:
            return None
        jobs, clips = [first], first[0].shape[0]
        while clips < self.max_batch:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._jobs.put(None)
                break
            jobs.append(job)
            clips += job[0].shape[0]
        return jobs

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            groups: dict[tuple, list] = {}
            for job in jobs:
                groups.setdefault(tuple(job[0].shape[1:]), []).append(job)
            for group in groups.values():
                self._run(group)

    def _run(self, jobs: list) -> None:
        jobs = [(v, h, f) for v, h, f in jobs if f.set_running_or_notify_cancel()]
        if not jobs:
            return
        try:
            with torch.no_grad():
                batch = torch.cat([v for v, _, _ in jobs]).to(self.device)
                if self.separate_heads:  # one encode for the batch, each call's rows through its own head
                    embeddings, logits, start = self.model.encode_video(batch), [], 0
                    for video, head, _ in jobs:
                        rows = embeddings[start:start + video.shape[0]]
                        logits.append(self.model.classify(rows, head).float().cpu())
                        start += video.shape[0]
                else:
                    out = self.model(batch).float().cpu()
                    bounds = torch.tensor([v.shape[0] for v, _, _ in jobs]).cumsum(0).tolist()
                    logits = [out[end - v.shape[0]:end] for (v, _, _), end in zip(jobs, bounds)]
            self.batches_run += 1
        except Exception as e:  # every caller of this batch gets the error; the worker goes on
            for _, _, f in jobs:
                f.set_exception(e)
            return
        for (_, _, f), result in zip(jobs, logits):
            f.set_result(result)


class LabelledModel:
    """A request's view of a :class:`BatchingModel` that classifies into its own label names
    through ``head`` (None, with ``class_names`` None: the model's own head and classes), with
    the interface of the prediction functions (callable, ``class_names``, ``num_classes``,
    ``config``, ``device``). Once ``cancel`` is set, its calls raise
    :class:`~dist_video.data.decoding.Cancelled` instead of running."""

    def __init__(self, batching: BatchingModel, head, class_names: list[str] | None,
                 cancel: threading.Event | None = None):
        self.batching = batching
        self.head = head
        self.class_names = list(class_names) if class_names is not None else batching.class_names
        self.num_classes = len(self.class_names) if self.class_names else batching.num_classes
        self.config = batching.config
        self.device = batching.device
        self.cancel = cancel

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled before the model ran")
        return self.batching(video, self.head, self.cancel)
