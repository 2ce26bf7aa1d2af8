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
import http.client
import io
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

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


def values_to_json(values: torch.Tensor) -> list[float | None]:
    """float [B] -> a JSON list, non-finite values as null."""
    return [v if math.isfinite(v) else None for v in values.detach().to("cpu", torch.float64).tolist()]


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


class RemoteReward:
    """url: the server's endpoint (http or https); timeout: seconds per attempt; retries: further
    attempts after a connection error, timeout or 5xx, waiting ``backoff * 2**k`` seconds before
    the k-th (4xx is never retried)."""

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

    def _fail(self, reason: str) -> RemoteRewardError:
        return RemoteRewardError(f"reward server {self.url}: {reason}")

    def post(self, body: bytes) -> bytes:
        """POST ``body`` (JSON) and return the response body, retrying transient failures."""
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(
                self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                failure = f"HTTP {exc.code} {exc.reason}{_error_text(exc)}"
                if exc.code < 500:
                    raise self._fail(failure) from None
            except TimeoutError:
                failure = f"no response within {self.timeout:g} s (timeout)"
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, TimeoutError):
                    failure = f"no connection within {self.timeout:g} s (timeout)"
                else:
                    failure = f"cannot connect ({exc.reason})"
            except (ConnectionError, http.client.HTTPException) as exc:
                failure = f"connection failed ({type(exc).__name__}: {exc})"
        attempts = "1 attempt" if self.retries == 0 else f"{self.retries + 1} attempts"
        raise self._fail(f"{failure}; gave up after {attempts}")

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


def _error_text(exc: urllib.error.HTTPError) -> str:
    """': <the server's error line>' from an error response body, or '' when it has none."""
    try:
        text = exc.read().decode("utf-8", "replace")
    except OSError:
        return ""
    try:
        data = json.loads(text)
        text = str(data["error"]) if isinstance(data, dict) and "error" in data else text
    except ValueError:
        pass
    line = text.strip().splitlines()[0] if text.strip() else ""
    return f": {line[:200]}" if line else ""
