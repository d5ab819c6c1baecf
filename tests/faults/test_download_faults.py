"""Download faults, injected for real: a server on 127.0.0.1 that fails, drops, stalls or lies on cue.

Transient failures (HTTP 429/5xx, a dropped connection, a timeout) are retried with exponential
backoff, a bounded number of times, resuming with a Range request where the server honours one;
HTTP 4xx, a refused connection and wrong bytes fail at once. No partial file ever stays behind.

Waits are checked from below exactly (a sleep is never shorter) and from above with room for a shared
machine several times slower than a quiet one, still short of what a wrong wait or an extra retry costs.
"""

import hashlib
import http.server
import random
import re
import threading
import time

import pytest

from conftest import closed_port_url
from pipeline import data
from pipeline.config import DataConfig

PAYLOAD = random.Random(0).randbytes(300_000)
HALF = len(PAYLOAD) // 2
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
SHIPPED_BACKOFF_BASE_S, SHIPPED_MAX_ATTEMPTS = data.BACKOFF_BASE_S, data.MAX_ATTEMPTS  # before any patching


# --- a misbehaving server ---------------------------------------------------------------------


class FaultyServer(http.server.ThreadingHTTPServer):
    """Serves PAYLOAD at any path, answering request i with step i of `script` (the last step repeats)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FaultyHandler)
        self.script = [serve]
        self.ranges = True  # whether `serve` honours Range requests
        self.requests: list[str | None] = []  # the Range header of each request, None if it had none
        self.released = threading.Event()  # ends every hang and stall
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/mnist.npz"

    def handle_error(self, request, client_address) -> None:
        pass  # a client that timed out has hung up: writing to it fails, as it should


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests.append(self.headers.get("Range"))
            step = self.server.script[min(len(self.server.requests), len(self.server.script)) - 1]
        step(self)

    def log_message(self, *args) -> None:
        pass


def serve(handler: FaultyHandler, payload: bytes = PAYLOAD) -> None:
    """Sends the file, only the requested tail if it was asked for one and the server honours Range."""
    match = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
    start = int(match.group(1)) if match and handler.server.ranges else 0
    handler.send_response(206 if start else 200)
    if start:
        handler.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
    handler.send_header("Content-Length", str(len(payload) - start))
    handler.end_headers()
    handler.wfile.write(payload[start:])


def fail_with(status: int):
    def step(handler: FaultyHandler) -> None:
        handler.send_error(status)
    return step


def drop_halfway(handler: FaultyHandler) -> None:
    """Announces the whole file, sends half of it, then closes the connection."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(PAYLOAD)))
    handler.end_headers()
    handler.wfile.write(PAYLOAD[:HALF])
    handler.close_connection = True


def hang(handler: FaultyHandler) -> None:
    """Accepts the request and answers nothing until the test ends."""
    handler.server.released.wait(30)


def stall_halfway(handler: FaultyHandler) -> None:
    """Announces the whole file, sends half of it, then sends nothing more until the test ends."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(PAYLOAD)))
    handler.end_headers()
    handler.wfile.write(PAYLOAD[:HALF])
    handler.wfile.flush()
    handler.server.released.wait(30)


def wrong_range(handler: FaultyHandler) -> None:
    """Answers a Range request with 206 but from byte 0, as a misconfigured cache might."""
    handler.send_response(206)
    handler.send_header("Content-Range", f"bytes 0-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
    handler.send_header("Content-Length", str(len(PAYLOAD)))
    handler.end_headers()
    handler.wfile.write(PAYLOAD)


def wrong_bytes(handler: FaultyHandler) -> None:
    """Sends a file of the right length with one byte flipped, as a corrupted mirror would."""
    corrupt = bytearray(PAYLOAD)
    corrupt[-100] ^= 0xFF
    serve(handler, bytes(corrupt))


@pytest.fixture
def server():
    """Yields a running FaultyServer that behaves until told otherwise; stops it after the test."""
    server = FaultyServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.released.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    """Retries at once, so that four attempts take milliseconds; tests of the backoff set their own."""
    monkeypatch.setattr(data, "BACKOFF_BASE_S", 0.0)


@pytest.fixture
def raw(tmp_path):
    """The download's target folder, as the download stage uses it."""
    return tmp_path / "data" / "raw" / "mnist"


def source(url: str) -> data.Source:
    return data.Source(url=url, sha256=SHA256, filename="mnist.npz")


def fetch(server: FaultyServer, raw, timeout: float = 5.0) -> int:
    return data.fetch(source(server.url), raw / "mnist.npz", timeout=timeout)


def assert_nothing_kept(raw) -> None:
    """No file, partial or temporary, is left in the target folder."""
    assert sorted(p.name for p in raw.iterdir()) == []


# --- HTTP status ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_server_errors_are_retried_until_the_verified_file_arrives(server, raw, status):
    server.script = [fail_with(status), fail_with(status), serve]
    assert fetch(server, raw) == len(PAYLOAD)
    assert (raw / "mnist.npz").read_bytes() == PAYLOAD
    assert len(server.requests) == 3
    assert sorted(p.name for p in raw.iterdir()) == ["mnist.npz"]


def test_server_errors_that_persist_give_up_after_the_bounded_attempts_naming_url_and_status(server, raw):
    server.script = [fail_with(503)]
    with pytest.raises(data.DataError) as error:
        fetch(server, raw)
    assert f"download of {server.url} failed: HTTP 503" in str(error.value)
    assert f"gave up after {data.MAX_ATTEMPTS} attempts" in str(error.value)
    assert not isinstance(error.value, data.NetworkUnreachable)  # the server answered: no offline fallback
    assert len(server.requests) == data.MAX_ATTEMPTS == 4
    assert_nothing_kept(raw)


@pytest.mark.parametrize("status", [400, 403, 404, 410])
def test_client_errors_fail_at_once_naming_url_and_status(server, raw, status):
    server.script = [fail_with(status)]
    with pytest.raises(data.DataError, match=f"download of {re.escape(server.url)} failed: HTTP {status}"):
        fetch(server, raw)
    assert len(server.requests) == 1
    assert_nothing_kept(raw)


def test_waits_between_attempts_double_from_the_backoff_base(monkeypatch):
    assert (SHIPPED_BACKOFF_BASE_S, SHIPPED_MAX_ATTEMPTS) == (1.0, 4)
    monkeypatch.setattr(data, "BACKOFF_BASE_S", 1.0)
    assert [data.backoff_s(attempt) for attempt in (1, 2, 3)] == [1.0, 2.0, 4.0]


def test_retries_really_wait_the_backoff(server, raw, monkeypatch):
    monkeypatch.setattr(data, "BACKOFF_BASE_S", 0.5)
    server.script = [fail_with(503)]
    started = time.monotonic()
    with pytest.raises(data.DataError, match="HTTP 503"):
        fetch(server, raw)
    # 0.5 + 1 + 2 s between the four attempts; waits twice as long, or a fifth attempt, would add 3.5 s or more.
    assert 0.5 + 1.0 + 2.0 <= time.monotonic() - started < 3.5 + 3.5


# --- a connection dropped halfway -------------------------------------------------------------


def test_a_dropped_connection_resumes_with_a_range_request(server, raw):
    server.script = [drop_halfway, serve]
    assert fetch(server, raw) == len(PAYLOAD)
    assert (raw / "mnist.npz").read_bytes() == PAYLOAD
    assert server.requests == [None, f"bytes={HALF}-"]


def test_a_dropped_connection_starts_over_where_the_server_ignores_ranges(server, raw):
    server.ranges = False
    server.script = [drop_halfway, serve]
    assert fetch(server, raw) == len(PAYLOAD)
    assert (raw / "mnist.npz").read_bytes() == PAYLOAD  # the whole file once, not half of it twice


def test_a_resume_answered_from_the_wrong_byte_is_discarded_and_started_over(server, raw):
    server.script = [drop_halfway, wrong_range, serve]
    assert fetch(server, raw) == len(PAYLOAD)
    assert (raw / "mnist.npz").read_bytes() == PAYLOAD
    assert server.requests == [None, f"bytes={HALF}-", None]


def test_a_connection_that_always_drops_fails_naming_the_url_and_keeps_nothing(server, raw):
    server.script = [drop_halfway]
    server.ranges = False
    with pytest.raises(data.IncompleteDownload) as error:
        fetch(server, raw)
    assert f"download of {server.url} broke off: {HALF} of {len(PAYLOAD)} bytes received" in str(error.value)
    assert len(server.requests) == data.MAX_ATTEMPTS
    assert_nothing_kept(raw)


# --- a slow server ----------------------------------------------------------------------------


def test_a_server_that_never_answers_times_out_naming_the_url_within_the_timeout(server, raw):
    server.script = [hang]
    started = time.monotonic()
    with pytest.raises(data.DownloadTimeout) as error:
        fetch(server, raw, timeout=0.3)
    elapsed = time.monotonic() - started
    assert f"download of {server.url} timed out: no data for 0.3 s" in str(error.value)
    assert len(server.requests) == data.MAX_ATTEMPTS
    assert 0.3 * data.MAX_ATTEMPTS <= elapsed < data.TIMEOUT_S  # each attempt waited 0.3 s, not the default
    assert_nothing_kept(raw)


def test_a_slow_first_answer_is_retried(server, raw):
    server.script = [hang, serve]
    assert fetch(server, raw, timeout=0.3) == len(PAYLOAD)
    assert (raw / "mnist.npz").read_bytes() == PAYLOAD


def test_a_stall_mid_body_times_out_and_resumes_where_it_stopped(server, raw):
    server.script = [stall_halfway, serve]
    assert fetch(server, raw, timeout=0.3) == len(PAYLOAD)
    assert (raw / "mnist.npz").read_bytes() == PAYLOAD
    assert server.requests == [None, f"bytes={HALF}-"]


def test_a_refused_connection_is_unreachable_at_once(raw, monkeypatch):
    monkeypatch.setattr(data, "BACKOFF_BASE_S", 10.0)  # a retry would show as seconds of waiting
    url = closed_port_url() + "/mnist.npz"
    started = time.monotonic()
    with pytest.raises(data.NetworkUnreachable, match=f"cannot reach {re.escape(url)}"):
        data.fetch(source(url), raw / "mnist.npz")
    assert time.monotonic() - started < data.BACKOFF_BASE_S  # less than one wait before a retry
    assert_nothing_kept(raw)


# --- wrong bytes ------------------------------------------------------------------------------


def test_wrong_bytes_fail_the_checksum_naming_both_hashes_without_a_retry(server, raw):
    server.script = [wrong_bytes]
    corrupt = bytearray(PAYLOAD)
    corrupt[-100] ^= 0xFF
    with pytest.raises(data.ChecksumError) as error:
        fetch(server, raw)
    assert f"expected sha256 {SHA256}" in str(error.value)
    assert f"got {hashlib.sha256(bytes(corrupt)).hexdigest()}" in str(error.value)
    assert len(server.requests) == 1
    assert_nothing_kept(raw)


def test_wrong_bytes_after_a_resume_are_not_accepted(server, raw):
    server.script = [drop_halfway, wrong_bytes]
    with pytest.raises(data.ChecksumError, match=f"expected sha256 {SHA256}"):
        fetch(server, raw)
    assert_nothing_kept(raw)


# --- through the download stage ---------------------------------------------------------------


def mnist_config(server: FaultyServer) -> DataConfig:
    return DataConfig(name="mnist", limit=None, offline_fallback=True, mirror=server.url.rsplit("/", 1)[0],
                      holdout_fraction=0.1)


@pytest.mark.parametrize("script, error", [
    ([fail_with(503)], "HTTP 503"),
    ([fail_with(404)], "HTTP 404"),
    ([drop_halfway], "broke off"),
    ([wrong_bytes], "checksum mismatch"),
], ids=["503", "404", "dropped", "wrong-bytes"])
def test_a_failed_download_leaves_data_raw_empty_and_does_not_fall_back(server, raw, monkeypatch, script, error):
    monkeypatch.setitem(data.SOURCES, "mnist", (source("unused"),))
    server.script = script
    with pytest.raises(data.DataError, match=error):
        data.download_dataset(mnist_config(server), raw)
    assert_nothing_kept(raw)


def test_mnist_falls_back_when_the_server_never_answers(server, raw, monkeypatch):
    monkeypatch.setattr(data, "TIMEOUT_S", 0.2)
    monkeypatch.setitem(data.SOURCES, "mnist", (source("unused"),))
    server.script = [hang]
    manifest = data.download_dataset(mnist_config(server), raw)
    assert manifest["offline_fallback"] is True
    assert f"download of {server.url} timed out" in manifest["fallback_reason"]
    assert sorted(p.name for p in raw.iterdir()) == sorted([data.FALLBACK_FILENAME, "manifest.json"])
