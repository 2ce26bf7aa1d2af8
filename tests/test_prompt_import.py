"""Importing Flow-GRPO's prompt-set formats (`tpgrpo prepare --from DIR`, data.source): the
records written, the format detection, one-line errors naming file and line, a failure that
writes nothing, the command line, and the prepare stage rerunning under real DVC when a source
file changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tpgrpo.cli import main
from tpgrpo.data import load_prompts
from tpgrpo.errors import PromptFileError
from tpgrpo.prompt_import import import_prompt_set
from tpgrpo.rewards.ocr import target_text

ROOT = Path(__file__).resolve().parents[1]

OCR_LINES = [
    'A storefront sign that reads "OPEN 24 H"',
    "a poster with “Café Noir” in bold letters",
    'two labels, "left" and "right"',
    "a quiet lake at dawn",
]


def write_source(directory: Path, files: dict[str, str | bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = directory / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return directory


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


GENEVAL_TRAIN = [
    {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}], "prompt": "a photo of a cat and a dog"},
    {"tag": "counting", "include": [{"class": "apple", "count": 3}], "exclude": [{"class": "apple", "count": 4}], "prompt": "a photo of three apples"},
]
GENEVAL_TEST = [{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}]


# ---------------------------------------------------------------- the records


def test_text_lines_become_prompts_with_their_quoted_text(tmp_path: Path) -> None:
    # A BOM, CRLF line ends, trailing and leading spaces, blank and whitespace-only lines.
    train = "\ufeff" + OCR_LINES[0] + "\r\n\r\n  " + OCR_LINES[1] + "  \n \t \n" + OCR_LINES[2] + "\n" + OCR_LINES[3]
    source = write_source(tmp_path / "ocr", {"train.txt": train, "test.txt": OCR_LINES[3] + "\n" + OCR_LINES[3] + "\n"})
    result = import_prompt_set(source, tmp_path / "out")

    assert result.format.name == "text"
    assert read_jsonl(tmp_path / "out" / "train.jsonl") == [
        {"prompt": OCR_LINES[0], "text": "OPEN 24 H"},
        {"prompt": OCR_LINES[1], "text": "Café Noir"},
        {"prompt": OCR_LINES[2], "text": "leftright"},
        {"prompt": OCR_LINES[3]},
    ]
    assert (result.train.prompts, result.train.with_text, result.train.duplicates) == (4, 3, 0)
    # A repeated prompt stays: each copy is sampled as a group of its own.
    assert read_jsonl(tmp_path / "out" / "test.jsonl") == [{"prompt": OCR_LINES[3]}] * 2
    assert (result.test.prompts, result.test.with_text, result.test.duplicates) == (2, 0, 1)
    assert result.train.path == tmp_path / "out" / "train.jsonl"


def test_the_imported_text_is_the_ocr_rewards_own_target(tmp_path: Path) -> None:
    prompts = [*OCR_LINES, 'an empty quote ""', 'mixed "a" and “b”', 'unclosed "quote']
    source = write_source(tmp_path / "ocr", {"train.txt": "\n".join(prompts), "test.txt": OCR_LINES[0]})
    import_prompt_set(source, tmp_path / "out")
    records = load_prompts(tmp_path / "out" / "train.jsonl")
    assert [r["prompt"] for r in records] == prompts
    for record in records:
        # What the reward reads from the record is what it would extract from the bare prompt.
        assert target_text(record["prompt"], record) == target_text(record["prompt"], {}), record
        assert ("text" in record) == bool(target_text(record["prompt"], {})), record


def test_geneval_records_are_kept_whole(tmp_path: Path) -> None:
    source = write_source(
        tmp_path / "geneval",
        {"train_metadata.jsonl": jsonl(GENEVAL_TRAIN) + "\n", "test_metadata.jsonl": jsonl(GENEVAL_TEST)},
    )
    result = import_prompt_set(source, tmp_path / "out")
    assert result.format.name == "geneval"
    assert load_prompts(tmp_path / "out" / "train.jsonl") == GENEVAL_TRAIN
    assert load_prompts(tmp_path / "out" / "test.jsonl") == GENEVAL_TEST
    assert (result.train.prompts, result.train.with_text, result.test.prompts) == (2, 0, 1)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no prompt set found, expected train.txt + test.txt or train_metadata.jsonl + test_metadata.jsonl"),
        (
            {"train.txt": "a", "test.txt": "b", "train_metadata.jsonl": "{}", "test_metadata.jsonl": "{}"},
            "holds both a text (train.txt + test.txt) and a geneval (train_metadata.jsonl + test_metadata.jsonl)",
        ),
        ({"train.txt": "a"}, "test.txt not found (a text prompt set is train.txt + test.txt)"),
        ({"test_metadata.jsonl": "{}"}, "train_metadata.jsonl not found"),
    ],
    ids=["neither", "both", "half-text", "half-geneval"],
)
def test_a_directory_must_hold_exactly_one_pair(tmp_path: Path, files: dict[str, str], message: str) -> None:
    source = write_source(tmp_path / "src", files)
    with pytest.raises(PromptFileError) as err:
        import_prompt_set(source, tmp_path / "out")
    assert str(err.value).startswith(f"{source}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match=r"nowhere: prompt-set directory not found$"):
        import_prompt_set(tmp_path / "nowhere", tmp_path / "out")


@pytest.mark.parametrize(
    ("name", "content", "where", "message"),
    [
        ("train_metadata.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n', 2, "invalid JSON (Expecting ',' delimiter)"),
        ("train_metadata.jsonl", '\n["a photo of a cat"]\n', 2, "expected a JSON object, got list"),
        ("train_metadata.jsonl", '{"tag": "single_object"}\n', 1, "missing or empty string field 'prompt'"),
        ("train_metadata.jsonl", '{"prompt": "a"}\n{"prompt": "  "}\n', 2, "missing or empty string field 'prompt'"),
        ("train_metadata.jsonl", '{"prompt": 3}\n', 1, "missing or empty string field 'prompt'"),
        ("train.txt", b"a cat\na dog\n\xff\xfe a bird\n", 3, "not UTF-8 text"),
        ("train.txt", b"a cat\x00\x00\n", 1, "NUL byte (a binary file?)"),
        ("train.txt", "", None, "no prompts (the file is empty)"),
        ("train.txt", "\n  \n\r\n", None, "no prompts (the file is empty)"),
    ],
    ids=["json", "not-object", "no-prompt", "blank-prompt", "number-prompt", "not-utf8", "nul", "empty", "only-blank"],
)
def test_a_malformed_file_fails_naming_file_and_line(
    tmp_path: Path, name: str, content: str | bytes, where: int | None, message: str
) -> None:
    other = {"train.txt": "test.txt", "train_metadata.jsonl": "test_metadata.jsonl"}[name]
    good = '{"prompt": "ok"}\n' if name.endswith(".jsonl") else "ok\n"
    source = write_source(tmp_path / "src", {name: content, other: good})
    with pytest.raises(PromptFileError) as err:
        import_prompt_set(source, tmp_path / "out")
    place = f"{source / name}:{where}" if where else f"{source / name}"
    assert str(err.value) == f"{place}: {message}"
    assert not (tmp_path / "out").exists()


def test_a_malformed_test_file_writes_nothing(tmp_path: Path) -> None:
    """train.jsonl is not written, nor a previous pair replaced, when test's last line is bad."""
    source = write_source(tmp_path / "src", {"train.txt": "a cat\n", "test.txt": b"a dog\n\xc3\n"})
    with pytest.raises(PromptFileError, match=r"test\.txt:2: not UTF-8 text"):
        import_prompt_set(source, tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "train.jsonl").exists()

    previous = write_source(tmp_path / "prev", {"train.jsonl": '{"prompt": "old train"}\n', "test.jsonl": '{"prompt": "old test"}\n'})
    with pytest.raises(PromptFileError):
        import_prompt_set(source, previous)
    assert sorted(p.name for p in previous.iterdir()) == ["test.jsonl", "train.jsonl"]  # no temporary left
    assert load_prompts(previous / "train.jsonl") == [{"prompt": "old train"}]


# ---------------------------------------------------------------- the command line


def _prepare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tpgrpo", "prepare", "--params", str(ROOT / "params.yaml"), *args],
        cwd=cwd, capture_output=True, text=True,
    )


def test_prepare_from_imports_and_says_what_it_did(tmp_path: Path) -> None:
    source = write_source(tmp_path / "ocr", {"train.txt": "\n".join(OCR_LINES), "test.txt": f"{OCR_LINES[0]}\n{OCR_LINES[0]}\n"})
    out = tmp_path / "prompts"
    proc = _prepare("--from", str(source), "--set", f"data.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"{source}: text prompt set (train.txt + test.txt)",
        f"train: 4 prompts (3 with OCR text) -> {out / 'train.jsonl'}",
        f"test: 2 prompts (2 with OCR text; 1 duplicate kept as separate groups) -> {out / 'test.jsonl'}",
    ]
    # Outside data/sources/ (of the working directory): imported, with one warning line.
    assert proc.stderr.count("\n") == 1 and "warning" in proc.stderr and "data/sources/" in proc.stderr
    assert [r["prompt"] for r in load_prompts(out / "train.jsonl")] == OCR_LINES

    broken = write_source(tmp_path / "broken", {"train.txt": "a\n", "test.txt": b"\x00\n"})
    proc = _prepare("--from", str(broken), "--set", f"data.dir={out}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"tpgrpo prepare: error: {broken / 'test.txt'}:1: NUL byte (a binary file?)\n"
    assert [r["prompt"] for r in load_prompts(out / "train.jsonl")] == OCR_LINES


def test_a_source_under_data_sources_is_tracked_without_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_source(tmp_path / "data" / "sources" / "geneval", {"train_metadata.jsonl": jsonl(GENEVAL_TRAIN), "test_metadata.jsonl": jsonl(GENEVAL_TEST)})
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--params", str(ROOT / "params.yaml"), "--from", "data/sources/geneval"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith("data/sources/geneval: geneval prompt set (train_metadata.jsonl + test_metadata.jsonl)\n")
    assert load_prompts(tmp_path / "data" / "prompts" / "train.jsonl") == GENEVAL_TRAIN


@pytest.mark.parametrize("name", ["null", "1", "yes"])
def test_from_takes_a_directory_name_yaml_would_read_as_another_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    write_source(tmp_path / name, {"train.txt": "a cat\n", "test.txt": "a dog\n"})
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--params", str(ROOT / "params.yaml"), "--from", name, "--set", "data.dir=out"]) == 0
    assert load_prompts(tmp_path / "out" / "test.jsonl") == [{"prompt": "a dog"}]


def test_data_source_in_params_imports_and_null_generates_the_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_source(tmp_path / "data" / "sources" / "pick", {"train.txt": "a cat\n", "test.txt": "a dog\n"})
    monkeypatch.chdir(tmp_path)
    params = ["--params", str(ROOT / "params.yaml")]
    assert main(["prepare", *params, "--set", "data.source=data/sources/pick"]) == 0
    assert load_prompts(tmp_path / "data" / "prompts" / "test.jsonl") == [{"prompt": "a dog"}]
    capsys.readouterr()
    assert main(["prepare", *params, "--set", "data.num_train=3", "--set", "data.num_test=2"]) == 0
    assert "kind" in load_prompts(tmp_path / "data" / "prompts" / "test.jsonl")[0]  # a world record
    assert "prompt set" not in capsys.readouterr().out


# ---------------------------------------------------------------- under DVC


DVC = (sys.executable, "-m", "dvc")


def _run(repo: Path, *cmd: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr


def test_dvc_repro_reimports_when_a_source_file_changes(tmp_path: Path) -> None:
    """The real prepare stage (its cmd, deps, params and outs), alone in a fresh git + DVC repository."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["prepare"]
    assert "data/sources" in stage["deps"] and "data.source" in stage["params"]
    repo = tmp_path / "repo"
    for dep in stage["deps"]:
        if dep.startswith("tpgrpo/"):
            (repo / dep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / dep, repo / dep)
    (repo / "data" / "sources").mkdir(parents=True)
    shutil.copy2(ROOT / "data" / "sources" / "README.md", repo / "data" / "sources")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": stage}}, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = "data/sources/ocr"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_source(repo / "data" / "sources" / "ocr", {"train.txt": f"{OCR_LINES[0]}\n", "test.txt": f"{OCR_LINES[3]}\n"})
    _run(repo, "git", "init", "-q")
    _run(repo, *DVC, "init", "-q")
    _run(repo, *DVC, "config", "core.analytics", "false")
    train = repo / "data" / "prompts" / "train.jsonl"

    assert "Running stage 'prepare'" in _run(repo, *DVC, "repro")
    assert load_prompts(train) == [{"prompt": OCR_LINES[0], "text": "OPEN 24 H"}]
    assert "Running stage 'prepare'" not in _run(repo, *DVC, "repro")

    with (repo / "data" / "sources" / "ocr" / "train.txt").open("a") as f:
        f.write(f"{OCR_LINES[1]}\n")
    assert "Running stage 'prepare'" in _run(repo, *DVC, "repro")
    assert load_prompts(train)[1] == {"prompt": OCR_LINES[1], "text": "Café Noir"}
