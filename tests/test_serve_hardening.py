"""The server against hostile clients (issue 26): parameters that would size unbounded work,
decompression bombs, truncated files, timed-out work, slow clients, foreign Host/Origin
headers, bad tokens and a model that gives NaN. Each server runs on a loopback port in a
subprocess under an RSS watchdog of its own (the test kills it and fails past the limit)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from data_helpers import truncate, write_coded_video  # noqa: E402
from deploy_helpers import Server, make_tiny_model_folder, write_test_videos  # noqa: E402

from dist_video.serve import HostCheck, ServeSettings  # noqa: E402
from dist_video.serve.settings import allowed_host_names  # noqa: E402

TOKEN = "hardening-token"
#: The most a server may grow past its resident size at start before the watchdog kills it.
WATCHDOG_MARGIN = 1024 ** 3


class RssWatchdog:
    """Samples the server's RSS every 20 ms while open; past ``limit`` bytes it kills the server
    (``tripped``). ``peak``: the largest sample."""

    def __init__(self, server: Server, limit: int):
        self.server, self.limit, self.peak, self.tripped = server, limit, 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            try:
                rss = self.server.rss_bytes()
            except (OSError, RuntimeError):
                return
            self.peak = max(self.peak, rss)
            if rss > self.limit:
                self.tripped = True
                self.server.proc.kill()
                return

    def __enter__(self) -> "RssWatchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self.tripped, f"the server passed {self.limit / 2**20:.0f} MiB and was killed"


def watched_server(model: Path, tmp: Path, *args: str, token: str | None = None):
    return Server(model, "--clip-dtype", "fp32", *args, env={"TMPDIR": str(tmp)}, token=token)


def post(server, video: Path | None = None, *, data: bytes | None = None, params=None, headers=None, timeout=120):
    content = data if data is not None else video.read_bytes()
    files = {"video": (video.name if video else "clip.mp4", content, "video/mp4")}
    return httpx.post(server.url + "/predict", files=files, params=params, timeout=timeout,
                      headers=server.headers() if headers is None else headers)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_clip):
    return make_tiny_model_folder(tmp_path_factory.mktemp("hardening") / "model", tiny_clip)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return write_test_videos(tmp_path_factory.mktemp("videos"))


# ----------------------------------------------------------------------------- in process
def test_settings_refuse_blank_or_non_ascii_tokens_and_bounds_out_of_range():
    assert ServeSettings(token="abc-123_XYZ").check().token == "abc-123_XYZ"
    for token, message in [("", "empty or blank"), ("   ", "empty or blank"), ("t\u00f6ken", "printable ASCII"),
                           (" padded", "printable ASCII"), ("two words", "printable ASCII"),
                           ("tab\there", "printable ASCII")]:
        with pytest.raises(ValueError, match=message):
            ServeSettings(token=token).check()
    for name, value in [("timeout", float("inf")), ("max_views", 0), ("header_timeout", float("nan")),
                        ("max_decoded_bytes", -1)]:
        with pytest.raises(ValueError, match=f"{name} must be a finite positive number"):
            ServeSettings(**{name: value}).check()


def test_host_names_follow_the_bound_address():
    assert allowed_host_names("127.0.0.1") == {"127.0.0.1", "::1", "localhost"}
    assert allowed_host_names("192.168.1.5", ["Example.COM"]) == {"192.168.1.5", "example.com"}
    assert allowed_host_names("0.0.0.0") is None  # every interface: no name to check against
    assert allowed_host_names("0.0.0.0", ["example.com"]) == {"example.com"}
    assert allowed_host_names("127.0.0.1", ["*"]) is None


def test_host_and_origin_refusals():
    check = HostCheck(None, names=frozenset({"127.0.0.1", "localhost", "::1"}), origins=frozenset({"proxy.example"}))

    def refusal(host: str, origin: str | None = None):
        headers = [(b"host", host.encode())] + ([(b"origin", origin.encode())] if origin is not None else [])
        found = check.refusal({"type": "http", "headers": headers})
        return found[0] if found else None

    assert refusal("127.0.0.1:8000") is None and refusal("[::1]:8000") is None and refusal("LOCALHOST") is None
    assert refusal("127.0.0.1:8000", "http://127.0.0.1:8000") is None  # the page itself
    assert refusal("127.0.0.1:8000", "https://proxy.example") is None  # a name listed in --allowed-hosts
    for host in ["evil.example:8000", "", "127.0.0.1:x", "user@127.0.0.1", "127.0.0.1/path"]:
        assert refusal(host) == 400, host  # DNS rebinding: a name that is not this server's
    for origin in ["http://evil.example", "null", "http://127.0.0.1:9999", "file://", "http://127.0.0.1:8000/x"]:
        assert refusal("127.0.0.1:8000", origin) == 403, origin  # a cross-site page posting here


# ----------------------------------------------------------------------------- the real server
@pytest.mark.slow
def test_hostile_parameters_and_bombs_get_400_before_any_decoding(model_folder, videos, tmp_path):
    """Window, stride and views values that would size unbounded work, frames larger than the
    frame-size limit, more frames or decoded bytes than allowed: 400 naming the bound, with the
    server's memory within 10% of before (sampled every 20 ms); a truncated file: 422."""
    big = write_coded_video(tmp_path / "big.mp4", 10, width=200, height=120)  # 24000 px > 20000
    fast_start = write_coded_video(tmp_path / "fs.mp4", 60, width=96, height=72,
                                   container_options={"movflags": "faststart"})
    cut = truncate(fast_start, tmp_path / "cut.mp4", 0.6)  # its index (at the front) lists 60 frames
    with watched_server(model_folder, tmp_path, "--max-frame-pixels", "20000", "--max-frames", "256",
                        "--max-decoded-mb", "2") as server:
        ok = post(server, videos[0], params={"window": 0.5, "stride": 100})
        assert ok.status_code == 200, ok.text
        assert [w["start"] for w in ok.json()[0]["windows"]] == [0.0]  # no window after the end of the video
        assert post(server, videos[0]).status_code == 200
        before = server.rss_bytes()
        hostile = [
            ({"window": "1e-9"}, videos[0], "limit of 10000 windows"),
            ({"window": "1", "stride": "1e-6"}, videos[0], "limit of 10000 windows"),
            ({"window": "0.001", "stride": "0.0001"}, videos[0], "limit of 10000 windows"),
            ({"window": "inf"}, videos[0], "finite positive"),
            ({"window": "nan"}, videos[0], "finite positive"),
            ({"window": "-1"}, videos[0], "finite positive"),
            ({"window": "1", "stride": "inf"}, videos[0], "finite positive"),
            ({"window": "1e309"}, videos[0], "finite positive"),
            ({"stride": "1"}, videos[0], "stride needs a window"),
            ({"views": "1000"}, videos[0], "between 1 and 64"),
            ({"views": "1e9"}, videos[0], "must be an integer"),
            ({"views": "40"}, videos[0], "limit of 256 frames per request"),
            ({"views": "20"}, videos[0], "max_decoded_bytes"),
            ({"topk": "100000"}, videos[0], "between 1 and 50"),
            ({}, big, "limit of 20000 pixels"),
        ]
        with RssWatchdog(server, before + WATCHDOG_MARGIN) as watchdog:
            for params, video, bound in hostile:
                r = post(server, video, params=params, timeout=30)
                assert r.status_code == 400, (params, r.text)
                assert bound in r.json()["error"], (params, r.json())
            truncated = post(server, cut)
            assert truncated.status_code == 422 and "truncated" in truncated.json()["error"], truncated.text
            after = server.rss_bytes()
        assert watchdog.peak <= 1.10 * before and after <= 1.10 * before, (before, watchdog.peak, after)
        assert post(server, videos[1]).status_code == 200  # still serving
    print(f"\nhostile parameters: {len(hostile) + 1} bad requests, {len(hostile) + 4} in all; RSS before "
          f"{before / 2**20:.0f} MiB, peak {watchdog.peak / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB")


def busy(server) -> dict:
    return httpx.get(server.url + "/health", headers=server.headers(), timeout=5).json()


@pytest.mark.slow
def test_timed_out_work_is_cancelled_and_keeps_its_slot_until_it_stops(model_folder, videos, tmp_path):
    """Five requests that take longer than ``--timeout``: 504 each; the work threads never
    outnumber ``--max-concurrent`` (a slot is given back only when its work has stopped), and
    within 2 s of the last answer no request or decoding thread is alive."""
    long_video = write_coded_video(tmp_path / "long.mp4", 1800, width=96, height=72)  # 60 s
    params = {"window": "0.2", "stride": "0.04"}  # 1500 windows: seconds of work for the tiny model
    with watched_server(model_folder, tmp_path, "--timeout", "0.5", "--max-concurrent", "2") as server:
        before = server.rss_bytes()
        samples, stop = [], threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                samples.append(busy(server)["busy_workers"])

        with RssWatchdog(server, before + WATCHDOG_MARGIN):
            watcher = threading.Thread(target=sample, daemon=True)
            watcher.start()
            with ThreadPoolExecutor(5) as pool:
                answers = list(pool.map(lambda _: post(server, long_video, params=params, timeout=60), range(5)))
            answered = time.monotonic()
            assert [r.status_code for r in answers] == [504] * 5, [r.text for r in answers]
            assert all("limit of 0.5 s" in r.json()["error"] for r in answers)
            state = busy(server)
            while (state["busy_workers"] or state["decode_threads"]) and time.monotonic() < answered + 2:
                time.sleep(0.05)
                state = busy(server)
            stop.set()
            watcher.join(timeout=5)
        assert state["busy_workers"] == 0 and state["decode_threads"] == 0, state
        assert samples and max(samples) <= 2, samples  # --max-concurrent held while the work was cancelled
        assert post(server, videos[0], timeout=60).status_code == 200  # the slots came back
        leftovers = [p for p in tmp_path.rglob("upload-*") if p.is_file()]
        assert not leftovers, leftovers


def slow_header_client(port: int, stop: threading.Event, closed: list) -> None:
    """Send a request's headers 3 bytes at a time, 3 times a second, until ``stop`` or until
    the server closes the connection (then append the time and what it answered)."""
    request = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: video/mp4\r\n"
               b"X-Padding: " + b"a" * 200 + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(0.33)
        for i in range(0, len(request), 3):
            if stop.is_set():
                return
            try:
                sock.sendall(request[i:i + 3])
                answer = sock.recv(200)
            except socket.timeout:
                continue
            except OSError:
                answer = b"reset"
            closed.append((time.monotonic(), answer))
            return


@pytest.mark.slow
def test_slow_clients_do_not_lock_out_a_normal_client(model_folder, videos, tmp_path):
    """45 connections sending their headers at 3 bytes/s on a token server: a normal client
    (with the token) is answered within 2 s, and the slow ones are closed with 408 after
    ``--header-timeout``. A body that stops arriving gets 408 after ``--upload-timeout``."""
    with watched_server(model_folder, tmp_path, "--header-timeout", "2", "--upload-timeout", "1",
                        token=TOKEN) as server:
        assert post(server, videos[0]).status_code == 200
        before = server.rss_bytes()
        stop, closed = threading.Event(), []
        with RssWatchdog(server, before + WATCHDOG_MARGIN):
            clients = [threading.Thread(target=slow_header_client, args=(server.port, stop, closed), daemon=True)
                       for _ in range(45)]
            for c in clients:
                c.start()
            time.sleep(0.5)  # every slow client is connected and sending
            started = time.monotonic()
            health = httpx.get(server.url + "/health", headers=server.headers(), timeout=2)
            r = post(server, videos[1], timeout=2)
            elapsed = time.monotonic() - started
            assert health.status_code == 200 and r.status_code == 200, (health.text, r.text)
            assert elapsed < 2, elapsed
            for c in clients:
                c.join(timeout=10)
            stop.set()
            assert len(closed) == 45 and all(a.startswith(b"HTTP/1.1 408") for _, a in closed), closed[:3]
            assert max(t for t, _ in closed) - started < 5  # closed at the header timeout, not when done
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                             b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n" + b"x" * 10)
                sock.settimeout(5)
                stalled = b""
                while b"limit of 1 s" not in stalled:  # the head and the body can come in separate segments
                    chunk = sock.recv(400)
                    if not chunk:
                        break
                    stalled += chunk
            assert stalled.startswith(b"HTTP/1.1 408") and b"limit of 1 s" in stalled, stalled
        assert post(server, videos[2], timeout=10).status_code == 200
    print(f"\nslow clients: 45 slow-header connections, 1 stalled upload, normal client answered in {elapsed:.2f} s")


@pytest.mark.slow
def test_foreign_host_and_origin_are_refused_by_the_real_server(model_folder, videos, tmp_path):
    with watched_server(model_folder, tmp_path) as server:
        rebinding = httpx.get(server.url + "/health", headers={"Host": f"evil.example:{server.port}"})
        assert rebinding.status_code == 400 and "--allowed-hosts" in rebinding.json()["error"]
        cross = post(server, videos[0], headers={"Origin": "http://evil.example"})
        assert cross.status_code == 403 and "cross-origin" in cross.json()["error"]
        same = post(server, videos[0], headers={"Origin": server.url})
        assert same.status_code == 200, same.text


@pytest.mark.slow
def test_an_empty_token_is_refused_at_start(model_folder):
    proc = subprocess.run([sys.executable, "-m", "dist_video.cli", "serve", str(model_folder), "--token", "",
                           "--port", "9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "empty or blank" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_nan_weights_give_a_json_error(tmp_path, tiny_clip, videos):
    folder = make_tiny_model_folder(tmp_path / "nan-model", tiny_clip, head_fill=float("nan"))
    with watched_server(folder, tmp_path) as server:
        before = server.rss_bytes()
        with RssWatchdog(server, before + WATCHDOG_MARGIN):
            for params in ({}, {"window": "0.5"}):
                r = post(server, videos[0], params=params)
                body = json.loads(r.text)  # valid JSON (no bare NaN)
                assert r.status_code == 500 and "non-finite" in body["error"] and "nan-model" in body["error"], r.text
