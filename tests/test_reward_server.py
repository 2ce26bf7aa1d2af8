"""The reward-server protocol: the ``remote`` client against the reference server and against
scripted servers (failures, retries, timeouts, malformed responses)."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from tpgrpo import world
from tpgrpo.errors import UserError
from tpgrpo.rewards import RewardOutput, build_reward
from tpgrpo.rewards.remote import RemoteRewardError, decode_images, encode_images
from tpgrpo.rewards.serve import RewardServer

URL = r"reward server http://127\.0\.0\.1:\d+/"


def world_batch(n: int, seed: int):
    specs = world.sample_specs(n, seed, "train")
    images = torch.stack([world.image_to_tensor(world.render(s, 32, i)) for i, s in enumerate(specs)])
    return images, [s.prompt for s in specs], [s.to_dict() for s in specs]


@contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def reference_url() -> Iterator[str]:
    with serving(RewardServer(build_reward("verifiable"), "verifiable", "127.0.0.1", 0)) as url:
        yield url


Reply = tuple[int, bytes] | tuple[int, bytes, dict[str, str]] | Callable[[], tuple[int, bytes]]


@contextmanager
def scripted(*replies: Reply) -> Iterator[tuple[str, list[dict]]]:
    """A server answering the n-th POST with ``replies[n]``, (status, body) or (status, body,
    headers) (the last one repeats); yields its URL and the decoded requests it received."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            reply = replies[min(len(received), len(replies)) - 1]
            status, body, *headers = reply() if callable(reply) else reply
            try:
                self.send_response(status)
                for key, value in (headers[0] if headers else {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (the timeout test)

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with serving(server) as url:
        yield url, received


def ok(scores, details=None) -> tuple[int, bytes]:
    return 200, json.dumps({"scores": scores, **({"details": details} if details else {})}).encode()


# ---------------------------------------------------------------- reference server


def test_remote_equals_local_reward(reference_url: str) -> None:
    images, prompts, metadata = world_batch(6, 0)
    images[3] = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))  # a low score too
    local = build_reward("verifiable")(images, prompts, metadata)
    remote = build_reward("remote", url=reference_url)(images, prompts, metadata)
    assert remote.scores.dtype == torch.float32
    torch.testing.assert_close(remote.scores, local.scores)
    assert set(remote.details) == set(local.details)
    for name, value in local.details.items():
        torch.testing.assert_close(remote.details[name], value, equal_nan=True)  # NaN -> null -> NaN
    assert remote.scores.unique().numel() > 1


def test_reference_server_answers_get_and_rejects_bad_requests(reference_url: str) -> None:
    with urllib.request.urlopen(reference_url, timeout=10) as response:
        assert json.loads(response.read()) == {"reward": "verifiable"}
    images, prompts, metadata = world_batch(2, 1)
    body = json.dumps({"images": encode_images(images), "prompts": prompts[:1], "metadata": metadata}).encode()
    request = urllib.request.Request(reference_url, data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400 and "prompts: expected a list of 2 strings" in json.loads(info.value.read())["error"]
    # a request the reward itself rejects is a 4xx: the client does not retry it
    remote = build_reward("remote", url=reference_url, retries=3, backoff=5.0)
    start = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=rf"^{URL}: HTTP 422 .*does not match its metadata"):
        remote(images, ["a blue circle", prompts[1]], metadata)
    assert time.perf_counter() - start < 4


def test_images_survive_the_png_round_trip() -> None:
    images = (torch.rand(3, 3, 17, 23, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    assert torch.equal(decode_images(encode_images(images)), images)
    with pytest.raises(ValueError, match=r"images\[1\]: not a base64-encoded image"):
        decode_images([encode_images(images)[0], "bm90IGFuIGltYWdl"])
    with pytest.raises(ValueError, match=r"images\[1\]: size \(8, 8\) differs"):
        decode_images(encode_images(images[:1]) + encode_images(torch.zeros(1, 3, 8, 8)))


def test_serve_command(tmp_path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tpgrpo.rewards.serve", "--reward", "jpeg_incompressibility", "--option", "quality=80", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving reward 'jpeg_incompressibility' on http://127.0.0.1:"), line
        url = line.split(" on ")[1].strip()
        images, prompts, metadata = world_batch(2, 2)
        remote = build_reward("remote", url=url)(images, prompts, metadata)
        torch.testing.assert_close(remote.scores, build_reward("jpeg_incompressibility", quality=80)(images, prompts, metadata).scores)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run(
        [sys.executable, "-m", "tpgrpo.rewards.serve", "--reward", "nope"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "unknown reward 'nope'; available:" in bad.stderr


# ---------------------------------------------------------------- retries and failures


def test_5xx_is_retried_with_backoff() -> None:
    images, prompts, metadata = world_batch(2, 3)
    with scripted((500, b'{"error": "busy"}'), (503, b""), ok([0.25, None], {"x": [1, 2]})) as (url, received):
        start = time.perf_counter()
        out = build_reward("remote", url=url, retries=2, backoff=0.1)(images, prompts, metadata)
        elapsed = time.perf_counter() - start
    assert len(received) == 3
    assert elapsed >= 0.1 + 0.2  # waits backoff, then 2 * backoff
    assert out.scores[0] == 0.25 and math.isnan(out.scores[1]) and out.details["x"].tolist() == [1.0, 2.0]
    assert received[0]["prompts"] == prompts and received[0]["metadata"] == metadata
    assert torch.equal(decode_images(received[0]["images"]), images)


def test_5xx_gives_up_after_the_retries() -> None:
    images, prompts, metadata = world_batch(1, 4)
    with scripted((500, b'{"error": "CUDA out of memory"}')) as (url, received):
        with pytest.raises(RemoteRewardError, match=rf"^{URL}: HTTP 500 Internal Server Error: CUDA out of memory; gave up after 3 attempts$"):
            build_reward("remote", url=url, retries=2, backoff=0.0)(images, prompts, metadata)
    assert len(received) == 3


def test_4xx_is_not_retried() -> None:
    images, prompts, metadata = world_batch(1, 5)
    with scripted((400, b'{"error": "unknown metadata key"}'), ok([1.0])) as (url, received):
        with pytest.raises(RemoteRewardError, match=rf"^{URL}: HTTP 400 Bad Request: unknown metadata key$") as info:
            build_reward("remote", url=url, retries=3, backoff=0.0)(images, prompts, metadata)
    assert len(received) == 1
    assert isinstance(info.value, UserError)


def test_retry_waits_double_from_backoff() -> None:
    # The k-th retry arrives backoff * 2**k after the failure before it, from k = 0: urllib3 alone
    # would retry the first failure at once.
    arrivals: list[float] = []

    def arriving(reply: tuple[int, bytes]) -> Callable[[], tuple[int, bytes]]:
        def answer() -> tuple[int, bytes]:
            arrivals.append(time.perf_counter())
            return reply

        return answer

    images, prompts, metadata = world_batch(1, 10)
    busy = arriving((503, b'{"error": "busy"}'))
    with scripted(busy, busy, busy, arriving(ok([1.0]))) as (url, received):
        out = build_reward("remote", url=url, retries=3, backoff=0.2)(images, prompts, metadata)
    assert out.scores.tolist() == [1.0] and len(received) == 4
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    for k, gap in enumerate(gaps):
        assert 0.2 * 2**k <= gap < 0.2 * 2**k + 0.15, gaps


@pytest.mark.parametrize(
    ("status", "headers", "reason"),
    [(404, {}, "Not Found"), (413, {"Retry-After": "1"}, "Request Entity Too Large"), (429, {"Retry-After": "1"}, "Too Many Requests")],
)
def test_4xx_is_tried_once_even_with_retry_after(status: int, headers: dict[str, str], reason: str) -> None:
    images, prompts, metadata = world_batch(1, 11)
    with scripted((status, b'{"error": "not now"}', headers), ok([1.0])) as (url, received):
        start = time.perf_counter()
        with pytest.raises(RemoteRewardError, match=rf"^{URL}: HTTP {status} {reason}: not now$"):
            build_reward("remote", url=url, retries=3, backoff=5.0)(images, prompts, metadata)
        assert time.perf_counter() - start < 4
    assert len(received) == 1


def test_timeout_is_a_clear_error() -> None:
    images, prompts, metadata = world_batch(1, 6)

    def slow() -> tuple[int, bytes]:
        time.sleep(1.5)
        return ok([1.0])

    with scripted(slow) as (url, received):
        start = time.perf_counter()
        with pytest.raises(RemoteRewardError, match=rf"^{URL}: no response within 0.2 s \(timeout\); gave up after 2 attempts$"):
            build_reward("remote", url=url, timeout=0.2, retries=1, backoff=0.0)(images, prompts, metadata)
        assert time.perf_counter() - start < 1.4
    assert len(received) == 2


def test_unreachable_server() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    images, prompts, metadata = world_batch(1, 7)
    with pytest.raises(RemoteRewardError, match=rf"^reward server http://127.0.0.1:{port}/: cannot connect \(.*refused.*\); gave up after 2 attempts$"):
        build_reward("remote", url=f"http://127.0.0.1:{port}/", retries=1, backoff=0.0)(images, prompts, metadata)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>oops</html>", "malformed response: Expecting value"),
        (b"[1, 2]", 'expected a JSON object with "scores"'),
        (json.dumps({"scores": [1.0]}).encode(), "scores: expected a list of 2 numbers, got 1 entries"),
        (b'{"scores": [1.0, Infinity]}', "non-standard JSON constant Infinity"),
        (b'{"scores": [1.0, 1e999]}', r"scores\[1\]: expected a finite number or null, got inf"),
        (json.dumps({"scores": [1.0, "0.5"]}).encode(), r"scores\[1\]: expected a finite number or null, got '0.5'"),
        (json.dumps({"scores": [1.0, True]}).encode(), r"scores\[1\]: expected a finite number or null, got True"),
        (b'{"scores": [1.0, 1' + b"0" * 400 + b"]}", r"scores\[1\]: expected a finite number or null, got 1000"),
        (json.dumps({"scores": [1, 2], "details": {"x": [1]}}).encode(), "details.x: expected a list of 2 numbers"),
    ],
)
def test_malformed_responses_are_rejected(body: bytes, message: str) -> None:
    images, prompts, metadata = world_batch(2, 8)
    with scripted((200, body)) as (url, received):
        with pytest.raises(RemoteRewardError, match=rf"^{URL}: .*{message}") as info:
            build_reward("remote", url=url, retries=2)(images, prompts, metadata)
    assert "\n" not in str(info.value)
    assert len(received) == 1  # a malformed answer is not a transient failure


def test_remote_options_are_checked() -> None:
    with pytest.raises(ValueError, match="url must start with http:// or https://"):
        build_reward("remote", url="localhost:8765")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        build_reward("remote", url="http://x/", timeout=0)
    with pytest.raises(ValueError, match="retries must be an integer >= 0"):
        build_reward("remote", url="http://x/", retries=-1)
    with pytest.raises(ValueError, match="must be JSON-serialisable"):
        build_reward("remote", url="http://x/")(torch.zeros(1, 3, 8, 8), ["p"], [{"bad": object()}])


def test_remote_in_a_weighted_sum(reference_url: str) -> None:
    images, prompts, metadata = world_batch(3, 9)
    multi = build_reward("multi", weights={"remote": 2.0, "jpeg_compressibility": 0.1}, options={"remote": {"url": reference_url}})
    out = multi(images, prompts, metadata)
    local = build_reward("verifiable")(images, prompts, metadata)
    jpeg = build_reward("jpeg_compressibility")(images, prompts, metadata)
    torch.testing.assert_close(out.scores, 2.0 * local.scores + 0.1 * jpeg.scores)
    torch.testing.assert_close(out.details["remote/count"], local.details["count"], equal_nan=True)
    assert isinstance(out, RewardOutput)
