"""A reward computed by a server: the JSON protocol and its client (``remote``).

Scorers that need another environment (GenEval's detector, a VLM judge) run behind any HTTP
server that speaks this protocol; :mod:`tpgrpo.rewards.serve` is a reference server for the
registry's own rewards.

Request, ``POST <url>`` with ``Content-Type: application/json``::

    {"images": ["<base64 PNG>", ...], "prompts": ["...", ...], "metadata": [{...}, ...]}

images are 8-bit RGB PNGs, all of one size; the three lists have one entry per image.
Response, status 200::

    {"scores": [0.5, null, ...], "details": {"name": [...], ...}}

one finite number or ``null`` (not applicable, read as NaN) per image; ``details`` is optional.
Errors: status 4xx for a request the server will never accept (not retried), 5xx for a failure
that may pass (retried); the body may be ``{"error": "<one line>"}``.
"""

from __future__ import annotations

import base64
import io
import json
import math
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import urllib3
from PIL import Image
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from tpgrpo.errors import UserError
from tpgrpo.rewards import RewardOutput
from tpgrpo.rewards._common import check_batch, to_uint8


class RemoteRewardError(UserError, RuntimeError):
    """A reward server could not be reached, refused the request or sent a malformed response."""


def encode_images(images: torch.Tensor) -> list[str]:
    """Images float [B, 3, H, W] in [0, 1] -> base64 8-bit RGB PNGs (B)."""
    encoded = []
    for pixels in to_uint8(images):
        buffer = io.BytesIO()
        # PNG is lossless at any level; level 1 is the fastest to write.
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def decode_images(encoded: Sequence[str]) -> torch.Tensor:
    """Base64 PNGs (B, all one size) -> images float32 [B, 3, H, W] in [0, 1]."""
    if not encoded:
        raise ValueError("images: expected at least one image")
    arrays = []
    for i, text in enumerate(encoded):
        if not isinstance(text, str):
            raise ValueError(f"images[{i}]: expected a base64 string")
        try:
            with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        except (ValueError, OSError):
            raise ValueError(f"images[{i}]: not a base64-encoded image") from None
        if arrays[i].shape != arrays[0].shape:
            raise ValueError(f"images[{i}]: size {arrays[i].shape[:2]} differs from images[0] {arrays[0].shape[:2]}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def values_from_json(values: Any, batch: int, what: str) -> torch.Tensor:
    """A JSON list of B finite numbers or nulls -> float32 [B] (null -> NaN)."""
    if not isinstance(values, list) or len(values) != batch:
        got = f"{len(values)} entries" if isinstance(values, list) else type(values).__name__
        raise ValueError(f"{what}: expected a list of {batch} numbers, got {got}")
    out = []
    for i, value in enumerate(values):
        if value is None:
            out.append(math.nan)
            continue
        try:
            finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        except OverflowError:  # an integer beyond the float range
            finite = False
        if not finite:
            raise ValueError(f"{what}[{i}]: expected a finite number or null, got {repr(value)[:40]}")
        out.append(float(value))
    return torch.tensor(out, dtype=torch.float32)


def _pool_for(url: str, **options: Any) -> urllib3.PoolManager:
    """A connection pool for ``url``, through the proxy the environment names for it
    (``https_proxy``, ``http_proxy``, ``no_proxy``), as ``urllib.request`` would: urllib3 alone
    ignores those variables."""
    parts = urllib.parse.urlsplit(url)
    proxy = None if urllib.request.proxy_bypass(parts.hostname or "") else urllib.request.getproxies().get(parts.scheme)
    return urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)


def values_to_json(values: torch.Tensor) -> list[float | None]:
    """float [B] -> a JSON list, non-finite values as null."""
    return [v if math.isfinite(v) else None for v in values.detach().to("cpu", torch.float64).tolist()]


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


class _Retry(urllib3.util.Retry):
    """urllib3's retry policy, waiting before the first retry too.

    urllib3 sleeps ``backoff_factor * 2**(n - 1)`` after the n-th consecutive failure but skips the
    sleep after the first (its waits are 0, 2b, 4b, ...): a reward server that answers 5xx or
    refuses connections is busy or restarting, which an immediate retry rarely outlasts, so this
    protocol's waits are b, 2b, 4b, ...
    """

    def get_backoff_time(self) -> float:
        # Redirects are not followed, so the history holds only the consecutive failures.
        if len(self.history) == 1:
            return float(min(self.backoff_max, self.backoff_factor))
        return super().get_backoff_time()


class RemoteReward:
    """url: the server's endpoint (http or https); timeout: seconds to connect and to wait for each
    read; retries: further attempts after a connection error, timeout or 5xx, waiting
    ``backoff * 2**k`` seconds (at most 120, urllib3's cap) before the k-th, k = 0, 1, ...
    4xx is never retried, a ``Retry-After`` header is ignored and redirects are not followed.

    urllib3 does the retrying; the proxy settings of the environment apply as in ``urllib.request``."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward option url must start with http:// or https://, got {url!r}")
        if not timeout > 0:
            raise ValueError(f"remote reward option timeout must be > 0, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"remote reward option retries must be an integer >= 0, got {retries!r}")
        if not backoff >= 0:
            raise ValueError(f"remote reward option backoff must be >= 0, got {backoff!r}")
        self.url, self.timeout, self.retries, self.backoff = url, float(timeout), retries, float(backoff)
        self._retry = _Retry(
            total=retries,
            # Scoring has no side effects, so a POST is as safe to resend as a GET.
            allowed_methods={"POST"},
            status_forcelist=range(500, 600),
            backoff_factor=self.backoff,
            # The last 5xx comes back as a response, so its status and error line can be reported.
            raise_on_status=False,
            # urllib3 would also retry a 413 or 429 that carries Retry-After, and wait as long as the
            # header says (up to 6 hours); the schedule above is the documented one.
            respect_retry_after_header=False,
        )

    def _fail(self, reason: str) -> RemoteRewardError:
        return RemoteRewardError(f"reward server {self.url}: {reason}")

    def post(self, body: bytes) -> bytes:
        """POST ``body`` (JSON) and return the response body, retrying transient failures."""
        attempts = "1 attempt" if self.retries == 0 else f"{self.retries + 1} attempts"
        # A pool per call: a keep-alive connection left from the previous batch may have been closed
        # by the server meanwhile, and sending on it would spend a retry.
        with _pool_for(self.url, retries=self._retry, timeout=urllib3.Timeout(self.timeout)) as pool:
            try:
                response = pool.request(
                    "POST", self.url, body=body, headers={"Content-Type": "application/json"}, redirect=False
                )
            except MaxRetryError as exc:
                raise self._fail(f"{self._describe(exc.reason)}; gave up after {attempts}") from None
            except urllib3.exceptions.HTTPError as exc:  # not retried, e.g. a URL without a host
                raise self._fail(self._describe(exc)) from None
        if 200 <= response.status < 300:
            return response.data
        failure = f"HTTP {response.status} {response.reason}{_error_text(response.data)}"
        # A 5xx response is returned only once the retries are spent.
        raise self._fail(f"{failure}; gave up after {attempts}" if response.status >= 500 else failure)

    def _describe(self, error: Exception | None) -> str:
        """One line on why an attempt got no response."""
        if isinstance(error, ReadTimeoutError):
            return f"no response within {self.timeout:g} s (timeout)"
        if isinstance(error, NewConnectionError):  # a subclass of ConnectTimeoutError
            return f"cannot connect ({error.__cause__ or error})"
        if isinstance(error, ConnectTimeoutError):
            return f"no connection within {self.timeout:g} s (timeout)"
        if isinstance(error, SSLError):
            return f"cannot connect ({error})"
        if isinstance(error, ProtocolError) and len(error.args) == 2 and isinstance(error.args[1], Exception):
            error = error.args[1]  # ("Connection aborted.", <the socket or http.client error>)
        return f"connection failed ({type(error).__name__}: {error})"

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput:
        """images float [B, 3, H, W] in [0, 1] -> the server's scores float32 [B] and details
        ``{name: float32 [B]}`` (null -> NaN)."""
        batch = check_batch("remote", images, prompts, metadata)
        try:
            body = json.dumps(
                {"images": encode_images(images), "prompts": list(prompts), "metadata": list(metadata)}, allow_nan=False
            ).encode()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"remote reward: prompts and metadata must be JSON-serialisable ({exc})") from None
        raw = self.post(body)
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
            if not isinstance(data, dict) or "scores" not in data:
                raise ValueError('expected a JSON object with "scores"')
            scores = values_from_json(data["scores"], batch, "scores")
            details = data.get("details") or {}
            if not isinstance(details, dict):
                raise ValueError("details: expected an object of lists")
            return RewardOutput(
                scores=scores,
                details={str(k): values_from_json(v, batch, f"details.{k}") for k, v in details.items()},
            )
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise self._fail(f"malformed response: {str(exc).splitlines()[0]}") from None


def _error_text(body: bytes) -> str:
    """': <the server's error line>' from an error response body, or '' when it has none."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
        text = str(data["error"]) if isinstance(data, dict) and "error" in data else text
    except ValueError:
        pass
    line = text.strip().splitlines()[0] if text.strip() else ""
    return f": {line[:200]}" if line else ""
