"""A reference reward server: any registry reward behind the JSON protocol of
:mod:`tpgrpo.rewards.remote` (standard library ``http.server``).

    python -m tpgrpo.rewards.serve --reward verifiable --port 8765
    python -m tpgrpo.rewards.serve --reward pickscore --option path=/models/PickScore_v1 --option device=cuda

and in params.yaml: ``reward: {name: remote, options: {url: "http://host:8765/"}}``. Every path
accepts ``POST``; ``GET`` answers ``{"reward": <name>}`` (a health check).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from tpgrpo.fileio import parse_yaml
from tpgrpo.rewards import RewardFunction, available_rewards, build_reward
from tpgrpo.rewards.remote import decode_images, values_to_json


def parse_request(request: Any) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """A decoded request body -> images float32 [B, 3, H, W] in [0, 1], prompts, metadata
    (metadata may be omitted: B empty dicts)."""
    if not isinstance(request, dict):
        raise ValueError("expected a JSON object with images, prompts and metadata")
    images = request.get("images")
    if not isinstance(images, list):
        raise ValueError("images: expected a list of base64 PNGs")
    prompts = request.get("prompts")
    if not isinstance(prompts, list) or len(prompts) != len(images) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a list of {len(images)} strings")
    metadata = request.get("metadata", [{} for _ in images])
    if not isinstance(metadata, list) or len(metadata) != len(images) or not all(isinstance(m, dict) for m in metadata):
        raise ValueError(f"metadata: expected a list of {len(images)} objects")
    return decode_images(images), prompts, metadata


class RewardServer(ThreadingHTTPServer):
    """Serves ``reward`` under ``name``. Requests are read and decoded in parallel threads, but
    scored one at a time: a reward object (a model on one GPU, an OCR engine) is not assumed to be
    safe to call concurrently, and a GPU gains nothing from interleaved batches."""

    daemon_threads = True

    def __init__(self, reward: RewardFunction, name: str, host: str = "127.0.0.1", port: int = 8765) -> None:
        super().__init__((host, port), _Handler)
        self.reward, self.name = reward, name
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, allow_nan=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            # A client that timed out has closed the connection: one log line, not a traceback.
            self.log_error("client went away before the %d reply", status)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._reply(200, {"reward": self.server.name})

    def do_POST(self) -> None:  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length") or 0)
            images, prompts, metadata = parse_request(json.loads(self.rfile.read(length)))
        except ValueError as exc:  # includes a body that is not JSON
            self._reply(400, {"error": f"bad request: {str(exc).splitlines()[0]}"})
            return
        try:
            with self.server.lock:
                out = self.server.reward(images, prompts, metadata)
        except ValueError as exc:
            # The reward rejected its inputs (a prompt that does not match its metadata): the
            # same request would fail again, so 4xx keeps clients from retrying it.
            self._reply(422, {"error": str(exc).splitlines()[0]})
            return
        except Exception as exc:  # noqa: BLE001 (any scorer failure becomes a 500 the client may retry)
            self.log_error("reward %s failed: %r", self.server.name, exc)
            self._reply(500, {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
            return
        self._reply(200, {"scores": values_to_json(out.scores), "details": {k: values_to_json(v) for k, v in out.details.items()}})


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, parse_yaml(value) if value.strip() else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tpgrpo.rewards.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--reward", required=True, help=f"registry name ({', '.join(available_rewards())})")
    parser.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                        help="a reward option, value parsed as YAML (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    parser.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    args = parser.parse_args(argv)
    try:
        reward = build_reward(args.reward, **dict(args.option))
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = RewardServer(reward, args.reward, args.host, args.port)
    print(f"serving reward {args.reward!r} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
