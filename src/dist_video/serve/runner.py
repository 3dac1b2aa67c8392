"""Where requests wait and work: uploads received under their own time limit, a queue that
counts a request once its body has arrived, ``max_concurrent`` slots, and one thread per
request whose slot is given back only when that thread has stopped (a timed-out request's
work is cancelled, and keeps its slot until it has noticed)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from concurrent.futures import Future

from .batching import BatchingModel
from .loading import ServedModel
from .requests import RequestError, RequestOptions
from .settings import ServeSettings
from .work import run_request

__all__ = ["RequestRunner", "remove"]


class RequestRunner:
    """The server's state while it runs (made by :meth:`start`, ended by :meth:`stop`):
    ``uploading`` uploads being received, ``in_flight`` uploaded requests waiting or working,
    ``workers`` the requests' work threads still running (a cancelled one included)."""

    def __init__(self, served: ServedModel, settings: ServeSettings):
        self.served = served
        self.settings = settings
        self.uploading = 0
        self.in_flight = 0
        self.workers: set[threading.Thread] = set()
        self.tmp: str | None = None
        self.model: BatchingModel | None = None
        self.slots: asyncio.Semaphore | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="dist-video-serve-")  # mode 0700: this user's only
        self.model = BatchingModel(self.served.model, max_batch=self.settings.max_batch)
        self.slots = asyncio.Semaphore(self.settings.max_concurrent)
        self.loop = asyncio.get_running_loop()

    def stop(self) -> None:
        self.model.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def receive(self, read) -> tuple[str, str, dict]:
        """``(path, name, form fields)`` of an upload that ``read(path)`` (a coroutine function
        returning the client's name for the file and its form fields) writes to a fresh file in
        the private folder: 503 beyond ``max_uploads`` at once, 408 after ``upload_timeout``."""
        if self.uploading >= self.settings.max_uploads:
            raise RequestError(503, "the server is receiving too many uploads: try again later", {"Retry-After": "5"})
        fd, path = tempfile.mkstemp(prefix="upload-", dir=self.tmp)
        os.close(fd)
        self.uploading += 1
        try:
            name, fields = await asyncio.wait_for(read(path), self.settings.upload_timeout)
        except asyncio.TimeoutError:
            remove(path)
            raise RequestError(408, f"the upload did not arrive within the limit of {self.settings.upload_timeout:g} s"
                               ) from None
        except BaseException:
            remove(path)
            raise
        finally:
            self.uploading -= 1
        return path, name, fields

    async def answer(self, path: str, name: str, options: RequestOptions) -> dict:
        """The answer for an upload that has arrived (this takes ownership of ``path``): 503 when
        the queue is full, 504 after ``timeout`` seconds (the work is cancelled)."""
        if self.in_flight >= self.settings.max_concurrent + self.settings.max_queue:
            remove(path)
            raise RequestError(503, "the server is busy: try again later", {"Retry-After": "5"})
        self.in_flight += 1
        deadline = self.loop.time() + self.settings.timeout
        try:
            try:
                await asyncio.wait_for(self.slots.acquire(), self.settings.timeout)
            except asyncio.TimeoutError:
                remove(path)
                raise self.timed_out() from None
            cancel = threading.Event()
            work = asyncio.wrap_future(self.run_in_thread(path, name, options, cancel))
            try:
                return await asyncio.wait_for(asyncio.shield(work), max(0.0, deadline - self.loop.time()))
            except asyncio.TimeoutError:
                cancel.set()  # the thread stops at its next frame or clip, then gives the slot back
                work.add_done_callback(lambda f: f.cancelled() or f.exception())  # its Cancelled is expected
                raise self.timed_out() from None
        finally:
            self.in_flight -= 1

    def timed_out(self) -> RequestError:
        return RequestError(504, f"the request took longer than the limit of {self.settings.timeout:g} s")

    def run_in_thread(self, path: str, name: str, options: RequestOptions, cancel: threading.Event) -> Future:
        """Run the request in a thread of its own, which holds a slot (taken by the caller) until
        it ends, then deletes the upload and gives the slot back."""
        done: Future = Future()

        def work() -> None:
            result, error = None, None
            try:
                result = run_request(self.model, self.served, self.settings, path, name, options, cancel)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                error = e
            finally:  # all cleaned up before the request is answered
                remove(path)
                self.workers.discard(threading.current_thread())
                self.loop.call_soon_threadsafe(self.slots.release)
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        thread = threading.Thread(target=work, name="dist-video-request", daemon=True)
        self.workers.add(thread)
        thread.start()
        return done

    def busy(self) -> dict:
        """Counts for ``/health``: uploads, requests in flight, work and decoding threads alive."""
        decoding = sum(t.name == "dist-video-decode" and t.is_alive() for t in threading.enumerate())
        return {"uploading": self.uploading, "in_flight": self.in_flight, "busy_workers": len(self.workers),
                "decode_threads": decoding}


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

