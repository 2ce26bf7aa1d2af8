"""``model.path`` as a Hugging Face hub id or a local pipeline directory (``tpgrpo.models.hub_id``).

No test reaches the network. A hub id loads from a hub cache the test writes in the hub's own
layout, in a subprocess whose environment sets HF_HUB_CACHE and HF_HUB_OFFLINE before
huggingface_hub is imported, as a user's shell does; the hub's answers for a gated and a missing
repo come from a local HTTP server standing in for it (HF_ENDPOINT). The in-process tests patch
``huggingface_hub.constants``, the values the library reads at every call.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from tpgrpo.cli import main
from tpgrpo.config import ModelSection, config_from_dict
from tpgrpo.errors import ModelLoadError
from tpgrpo.models import SD3Adapter, check_family, hub_id, load_adapter, save_pipeline
from tpgrpo.policy import load_model

ROOT = Path(__file__).resolve().parents[1]
REPO = "owner/tiny-sd3"
TRANSFORMER = Path("transformer") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_pipe) -> Path:
    return save_pipeline(tiny_pipe, tmp_path_factory.mktemp("hub") / "saved")


def write_hub_cache(cache: Path, repo_id: str, pipeline_dir: Path) -> Path:
    """``pipeline_dir`` as ``hf download repo_id`` leaves it in the hub cache ``cache``: the files
    as blobs named by their hash, the snapshot of a commit as links to them, ``refs/main`` naming
    that commit. Returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in pipeline_dir.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(pipeline_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline, for this process (the constants huggingface_hub reads)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def hub_calls(monkeypatch) -> list[str]:
    """The hub lookups made: ``hf_hub_download`` (check_family's) and ``DiffusionPipeline.download``
    (what ``from_pretrained`` calls for anything but a local directory) fail and are recorded."""
    calls: list[str] = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(f"{name}{args}")
            raise AssertionError(f"{name} called")

        return call

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse("hf_hub_download"))
    monkeypatch.setattr(DiffusionPipeline, "download", refuse("DiffusionPipeline.download"))
    return calls


def _cfg(path: str, family: str = "sd3"):
    return config_from_dict({"model": {"path": path, "family": family, "resolution": 32}})


def _run(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, ``env`` set before anything is imported (and no token of
    the user's: nothing here needs one)."""
    env = {**{k: v for k, v in os.environ.items() if k != "HF_TOKEN"}, **env}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


# --- the rule -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, expected",
    [
        ("stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-medium"),
        ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-dev"),
        ("o_w.n-er/n.a_me-1", "o_w.n-er/n.a_me-1"),
        ("models/base", None),  # the project's base model, even before `tpgrpo pretrain` writes it
        ("here/pipeline", None),  # an existing directory shadows the hub id of its spelling
        ("data/prompts", None),  # data/ exists: a path below it, though missing
        ("/data/models/sd3.5-medium", None),
        ("/owner", None),
        ("./owner/name", None),
        ("../owner/name", None),
        ("~/name", None),
        ("~owner/name", None),
        ("owner/name/sub", None),  # more than one "/"
        ("owner/name/", None),
        ("gpt2", None),  # a bare name: only owner/name is looked up
        ("", None),
        ("owner/", None),
        (".cache/name", None),
        ("owner/name-", None),
        ("owner/na me", None),
        ("owner\\name", None),
        ("owner/näme", None),
    ],
)
def test_hub_id_rule(path: str, expected: str | None, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here" / "pipeline").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    assert hub_id(path) == expected


def test_a_path_object_and_the_config_default_are_local(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert hub_id(Path("owner/name")) is None  # only strings are looked up
    assert hub_id(ModelSection().path) is None


# --- local directories --------------------------------------------------------------------------


def test_a_local_directory_spelled_like_a_hub_id_loads_locally(
    tiny_pipe, saved, tmp_path, monkeypatch, hub_calls
) -> None:
    monkeypatch.chdir(tmp_path)
    save_pipeline(tiny_pipe, tmp_path / REPO)
    check_family(REPO, "sd3")
    adapter = load_adapter(REPO)
    assert isinstance(adapter, SD3Adapter) and hub_calls == []
    expected = load_file(saved / TRANSFORMER)
    assert all(torch.equal(t, expected[k]) for k, t in adapter.transformer.state_dict().items())


def test_missing_models_base_is_never_looked_up(tmp_path, monkeypatch, hub_calls) -> None:
    monkeypatch.chdir(tmp_path)
    check_family("models/base", "flux")  # nothing to read: passes without a lookup
    with pytest.raises(ModelLoadError) as info:
        load_model(_cfg("models/base"), "cpu")
    assert str(info.value) == "model.path: models/base: no such pipeline directory"
    assert hub_calls == []


# --- hub ids --------------------------------------------------------------------------------------

LOAD_FROM_CACHE = f"""
import torch
from safetensors.torch import save_file
from tpgrpo.models import load_adapter

adapter = load_adapter({REPO!r})
embeds = adapter.encode_prompts(["a red circle"], guidance_scale=2.0)
x = adapter.prepare_latents(1, torch.Generator().manual_seed(0))
t = adapter.timesteps(2).timesteps[0]
images = adapter.decode(x + adapter.velocity(x, t, embeds, 2.0))
assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
save_file(adapter.transformer.state_dict(), "transformer.safetensors")
print(type(adapter).__name__)
"""


def test_a_hub_id_loads_from_the_hub_cache_offline(saved, tmp_path) -> None:
    snapshot = write_hub_cache(tmp_path / "cache", REPO, saved)
    assert (snapshot / TRANSFORMER).is_symlink()
    result = _run(LOAD_FROM_CACHE, {"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SD3Adapter"
    loaded, expected = load_file(tmp_path / "transformer.safetensors"), load_file(saved / TRANSFORMER)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_offline_and_not_cached_is_one_line_naming_the_download(offline_cache) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(_cfg("owner/missing-model"), "cpu")
    assert str(info.value) == (
        f"model.path: owner/missing-model: not in the Hugging Face cache ({offline_cache}) and HF_HUB_OFFLINE is "
        "set: download it with `hf download owner/missing-model`, or unset HF_HUB_OFFLINE"
    )
    # The command named is the one huggingface_hub installs.
    assert (Path(sys.executable).parent / "hf").is_file()


def test_a_cached_hub_id_of_the_wrong_family_fails_before_weights_load(saved, offline_cache, monkeypatch) -> None:
    write_hub_cache(offline_cache, REPO, saved)
    loads: list[str] = []
    monkeypatch.setattr(DiffusionPipeline, "download", lambda *args, **kwargs: loads.append("download"))
    with pytest.raises(ModelLoadError, match=f"^model.family: expected sd3 for StableDiffusion3Pipeline at {REPO}, got flux$"):
        load_model(_cfg(REPO, family="flux"), "cpu")
    assert loads == []


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The hub's answers to anyone without access: 403 GatedRepo for repos named gated-*, else
    401 RepoNotFound (what the hub says of a missing or private repo)."""

    def answer(self) -> None:
        code, error = (403, "GatedRepo") if "/gated-" in self.path else (401, "RepoNotFound")
        self.send_response(code)
        self.send_header("X-Error-Code", error)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = answer

    def log_message(self, *args) -> None:
        pass


LOAD_ONLINE = """
from tpgrpo.models import ModelLoadError, check_family, load_adapter

for repo_id in ("owner/gated-model", "owner/missing-model"):
    check_family(repo_id, "sd3")  # model_index.json unreadable: loading reports why
    try:
        load_adapter(repo_id)
    except ModelLoadError as exc:
        print(exc)
"""


def test_online_a_gated_or_missing_repo_is_one_line_naming_the_cause(tmp_path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {
            "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "home"),  # no token of the user's goes to the stand-in
            "HF_HUB_CACHE": str(tmp_path / "cache"),
        }
        result = _run(LOAD_ONLINE, env, tmp_path)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "owner/gated-model: gated repo on the Hugging Face hub: accept its licence at "
        "https://huggingface.co/owner/gated-model and log in (hf auth login, or HF_TOKEN)",
        "owner/missing-model: no such repo on the Hugging Face hub, or a private one your token cannot see "
        "(hf auth login, or HF_TOKEN)",
    ]


@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_cli_reports_a_hub_id_not_cached_offline(command, offline_cache, tmp_path, capsys) -> None:
    """Both commands fail at once with the one line, before a run directory is opened."""
    runs = tmp_path / "runs"
    args = [command, "--params", str(ROOT / "params.yaml"), "--set", "model.path=owner/missing-model", "--set", f"runs_dir={runs}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tpgrpo {command}: error: model.path: owner/missing-model: ") and err.count("\n") == 1
    assert "hf download owner/missing-model" in err and "(set by --set model.path" in err
    assert not runs.exists()
