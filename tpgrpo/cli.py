"""The ``tpgrpo`` command. Every subcommand reads params.yaml through :mod:`tpgrpo.config`.

Errors that a user can fix (bad params, missing files) print one line to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Callable, Sequence

import yaml

from tpgrpo import __version__
from tpgrpo.config import DEFAULT_STUDY, ExperimentConfig, load_config, read_yaml_mapping
from tpgrpo.console import configure as configure_console
from tpgrpo.console import plural
from tpgrpo.errors import UserError
from tpgrpo.fileio import atomic_write_json


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="experiment file (default: %(default)s)")
    parser.add_argument(
        "--preset",
        default=None,
        metavar="FILE",
        help="params override file merged over --params before --variant and --set, "
        "e.g. configs/presets/sd35m_pickscore.yaml",
    )
    parser.add_argument("--variant", default=None, help="apply the overrides of this entry under 'variants'")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set credit.mode=incremental (repeatable)",
    )


def _config(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.params, preset=args.preset, variant=args.variant, overrides=args.overrides)


def _require_model(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    """Fail before a run is opened (and logged as failed) when model.path is neither a directory
    nor a hub id (cached, when HF_HUB_OFFLINE is set), naming the input that set it, or holds
    another model.family."""
    from tpgrpo.models import ModelLoadError, check_family, check_hub_cache, hub_id

    path = cfg.model.path
    origin = f"set by {_origin(args, cfg, 'model.path')}; override with --set model.path=DIR"
    if hub_id(path) is not None:
        try:
            check_hub_cache(path)
        except ModelLoadError as exc:
            raise UserError(f"model.path: {exc} ({origin})") from None
    elif not Path(path).is_dir():
        raise UserError(f"model.path: {path}: no such pipeline directory ({origin})")
    check_family(path, cfg.model.family)


def _origin(args: argparse.Namespace, cfg: ExperimentConfig, dotted: str) -> str:
    """The input that gave ``dotted`` its value: the last of --set, --variant, --preset and
    --params that sets it (--params also when none does: the schema default)."""
    if any(item.partition("=")[0].strip() == dotted for item in args.overrides):
        return f"--set {dotted}"
    if args.variant is not None and dotted in (cfg.variants.get(args.variant) or {}):
        return f"--variant {args.variant}"
    if args.preset is not None:
        node: object = read_yaml_mapping(args.preset, "preset")
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return str(args.preset)
    return str(args.params)


def cmd_prepare(args: argparse.Namespace) -> None:
    """Write the prompt sets data.dir/train.jsonl and data.dir/test.jsonl.

    With data.source null: the synthetic shape world, whose test prompts are held-out
    combinations (each contains a colour-shape pair that never occurs in the training prompts, nor
    in the images the base model is pretrained on). With data.source a directory (--from DIR):
    the prompt set it holds, train.txt / test.txt (one prompt a line; a quoted span becomes the
    OCR "text") or GenEval's train_metadata.jsonl / test_metadata.jsonl (records kept whole).
    `dvc repro` tracks a source under data/sources/.
    """
    cfg = _config(args)
    if cfg.data.source is None:
        _prepare_world(cfg)
    else:
        _import_prompt_set(Path(cfg.data.source), Path(cfg.data.dir))


def _prepare_world(cfg: ExperimentConfig) -> None:
    from tpgrpo.world import load_prompts, write_prompt_sets

    paths = write_prompt_sets(cfg.data.dir, cfg.data.num_train, cfg.data.num_test, cfg.data.seed)
    for split, path in (("train", paths.train), ("test", paths.test)):
        print(f"{split}: {len(load_prompts(path))} prompts -> {path}")


# The prepare stage of dvc.yaml depends on this directory: a source elsewhere is not tracked.
DVC_SOURCES = Path("data/sources")


def _import_prompt_set(source: Path, out_dir: Path) -> None:
    from tpgrpo.prompt_import import import_prompt_set

    result = import_prompt_set(source, out_dir)
    print(f"{source}: {result.format.name} prompt set ({result.format.files})")
    for split, summary in (("train", result.train), ("test", result.test)):
        notes = []
        if summary.with_text:
            notes.append(f"{summary.with_text} with OCR text")
        if summary.duplicates:
            notes.append(f"{plural(summary.duplicates, 'duplicate')} kept as separate groups")
        detail = f" ({'; '.join(notes)})" if notes else ""
        print(f"{split}: {plural(summary.prompts, 'prompt')}{detail} -> {summary.path}")
    if not source.resolve().is_relative_to(DVC_SOURCES.resolve()):
        print(
            f"tpgrpo prepare: warning: data.source {source} is outside {DVC_SOURCES}/, so `dvc repro` does not "
            f"track it (a change there does not rerun prepare); copy it under {DVC_SOURCES}/ to track it",
            file=sys.stderr,
        )


def cmd_pretrain(args: argparse.Namespace) -> None:
    """Train the embedded tiny SD3 base model on the synthetic world and save it to model.path.

    Trains the VAE, then the MMDiT transformer (settings under `pretrain`), saves the pipeline
    with save_pretrained, reloads it with StableDiffusion3Pipeline.from_pretrained, and evaluates
    it and an untrained copy on the test prompts as the training runs evaluate (eval section,
    seed). Writes --report (JSON metrics) and a sample grid beside it (PNG).
    """
    
    from tpgrpo.evaluate import save_grid
    from tpgrpo.pretrain import pretrain
    from tpgrpo.world import load_prompts

    cfg = _config(args)
    if cfg.model.resolution != cfg.pretrain.image_size:
        raise UserError(
            f"model.resolution: expected pretrain.image_size ({cfg.pretrain.image_size}), the size the base "
            f"model is trained at, got {cfg.model.resolution}"
        )
    # The training runs' evaluation prompts (eval.num_prompts), settings (eval) and noise seed
    # (seed), so the base reward here is their epoch-0 evaluation reward.
    test = load_prompts(Path(cfg.data.dir) / "test.jsonl")[: cfg.eval.num_prompts]
    result = pretrain(
        cfg.model.path, cfg.pretrain, seed=cfg.seed, test_prompts=test, evaluation=cfg.eval, training_reward=cfg.reward
    )
    report = Path(args.report)
    # No wall-clock time here: a DVC output, the same for every pretraining of the commit.
    metrics = {
        "reward_base": result.reward_base,
        "reward_untrained": result.reward_untrained,
        "vae_test_mse": result.vae_test_mse,
        "vae_recon_reward": result.vae_recon_reward,
        **{f"base_{k}": v for k, v in result.reward_details.items()},
    }
    atomic_write_json(report, metrics, allow_nan=True)
    grid = save_grid(result.evaluation, report.with_suffix(".png"))
    print(
        f"base model -> {cfg.model.path}: reward {result.reward_base:.3f} on {len(test)} test prompts "
        f"(untrained {result.reward_untrained:.3f}) in {result.seconds_total / 60:.1f} min; samples: {grid}"
    )


def cmd_train(args: argparse.Namespace) -> None:
    """Fine-tune the base model with GRPO for one variant (TP-GRPO, Flow-GRPO, ...).

    Writes runs/<variant>/ (or runs/<NAME>/ with --run-name NAME: checkpoints/, history.csv,
    metrics.json, summary.json, final/, samples/) and logs the run to MLflow. Resumes from the newest checkpoint
    of that run directory unless --restart. Multi-GPU / multi-node: run it under `accelerate launch`.
    """
    # The configuration is checked before torch and diffusers load: a typo fails in a second.
    cfg = _config(args)
    from tpgrpo.runguard import check_run_name

    variant = args.variant or "default"
    name = variant if args.run_name is None else check_run_name(args.run_name)
    _require_model(cfg, args)
    from tpgrpo.trainer import train_variant_run

    outcome = train_variant_run(cfg, name=name, variant=variant, restart=args.restart, parent_run_id=args.parent_run_id)
    result = outcome.result
    if outcome.is_main:
        before = "n/a" if result.eval_reward_initial is None else f"{result.eval_reward_initial:.4f}"
        print(
            f"{name}: {plural(result.epochs, 'epoch')} in {result.minutes:.1f} min; "
            f"eval reward {before} -> {result.eval_reward_final:.4f}; outputs in {result.run_dir}"
        )


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Evaluate the base model (no --variant) or a variant's trained weights (runs/<variant>/final)
    on the test prompts with ODE sampling (eval.num_steps, eval.guidance_scale), on the GPU when
    there is one, in model.dtype and with the model's memory options.

    Prints the mean reward and its per-constraint means; --out writes them as JSON, with a sample
    grid beside it (<out>.png) and the first 16 samples as PNGs in <out>_images/.
    """
    cfg = _config(args)
    _require_model(cfg, args)
    import torch

    from tpgrpo.data import load_prompt_set
    from tpgrpo.evaluate import evaluate_prompts, save_grid, save_images
    from tpgrpo.rewards import reward_from_section
    from tpgrpo.policy import load_model

    adapter = load_model(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    pipe = adapter.pipe
    if args.variant:
        final = Path(cfg.runs_dir) / args.variant / "final"
        if not final.is_dir():
            raise UserError(f"{final}: no trained weights; run `tpgrpo train --variant {args.variant}` first")
        if (final / "transformer").is_dir():
            base = pipe.transformer
            pipe.transformer = type(base).from_pretrained(final / "transformer", dtype=base.dtype).to(base.device)
        else:
            # The transformer's own loader: the run has no text-encoder LoRA to look for.
            pipe.transformer.load_lora_adapter(
                final, weight_name="pytorch_lora_weights.safetensors", prefix="transformer"
            )
    test = load_prompt_set(Path(cfg.data.dir) / "test.jsonl")
    if cfg.eval.num_prompts is not None:
        test = test.take(list(range(min(cfg.eval.num_prompts, len(test)))))
    result = evaluate_prompts(
        adapter,
        test,
        reward_from_section(cfg.eval.reward or cfg.reward),
        num_steps=cfg.eval.num_steps,
        guidance_scale=cfg.eval.guidance_scale,
        batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
        resolution=cfg.model.resolution,
    )
    summary = {"model": args.variant or "base", "reward": result.reward, "prompts": len(test), **result.details}
    print(_evaluation_summary(summary["model"], result.reward, len(test), result.details))
    if args.out:
        out = atomic_write_json(args.out, summary, allow_nan=True)
        save_grid(result, out.with_suffix(".png"))
        # The first samples at the model's resolution: what the README's diffusers snippet gives.
        images = save_images(result, out.with_name(f"{out.stem}_images"))
        if args.variant:
            _log_evaluation(cfg, args.variant, [out, out.with_suffix(".png")], images)


def _log_evaluation(cfg: ExperimentConfig, variant: str, files: list[Path], images: list[Path]) -> None:
    """Attach the evaluation's files to the MLflow run that trained the weights (artifacts under
    ``evaluate/``). The evaluation stands without it: a missing run is a warning, not an error."""
    from tpgrpo.errors import TrackingError
    from tpgrpo.rundir import read_run_id
    from tpgrpo.tracking import log_to_run

    run_id = read_run_id(Path(cfg.runs_dir) / variant)
    try:
        log_to_run(cfg.tracking.uri, run_id, files, artifact_path="evaluate")
        log_to_run(cfg.tracking.uri, run_id, images, artifact_path="evaluate/images")
    except TrackingError as exc:
        print(f"tpgrpo evaluate: warning: not logged to MLflow: {exc}", file=sys.stderr)


def _evaluation_summary(model: str, reward: float, prompts: int, details: dict[str, float]) -> str:
    """``tp_grpo: eval reward 0.5277 on 256 test prompts`` and one indented line per component."""
    lines = [f"{model}: eval reward {reward:.4f} on {prompts} test prompts"]
    width = max((len(k) for k in details), default=0)
    lines += [f"  {k:<{width}}  {v:.4f}" for k, v in details.items()]
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> None:
    """Compare the variants' runs (runs/<variant>/metrics.json and history.csv): writes the
    ablation table (reports/ablation.md, reports/ablation.json) and plots (reward per epoch,
    turning-point rate per step); with --parent-run-id also logs them to that MLflow run."""
    from tpgrpo.reporting.report import build_report

    cfg = _config(args)
    variants = args.variants or cfg.pipeline.variants
    report = build_report(
        cfg.runs_dir,
        variants,
        args.out,
        tracking_uri=cfg.tracking.uri if args.parent_run_id else None,
        parent_run_id=args.parent_run_id,
    )
    print(report.markdown)
    print(f"report: {report.markdown_path}")
    print(mlflow_hint(cfg))


def mlflow_hint(cfg: ExperimentConfig) -> str:
    """How to see the runs: the `mlflow ui` command and the address that opens the runs table
    with its key metrics (MLflow's own first screen is its GenAI view)."""
    from tpgrpo.tracking import ui_url

    url = ui_url(cfg.tracking.uri, cfg.tracking.experiment) or "http://127.0.0.1:5000"
    return f"MLflow: `mlflow ui --backend-store-uri {cfg.tracking.uri}`, then open {url}"


def cmd_study(args: argparse.Namespace) -> None:
    """Rebuild a study's report from the runs already under ablation.runs_dir: <study>.md,
    <study>.json and plots in ablation.reports_dir. --study NAME picks a study under `studies`
    (default: the `ablation` section). The study itself runs as the Prefect deployment
    tpgrpo/ablation (--param study=NAME)."""
    from tpgrpo.reporting.study import build_study_report
    from tpgrpo.rundir import study_run_name

    cfg = _config(args)
    spec = cfg.study(args.study)
    name = args.study or DEFAULT_STUDY
    if not spec.variants:
        raise UserError(f"{args.params}: {name}: variants is empty; list the study's variants there")
    settings = spec.override_list()
    modes = {
        variant: load_config(args.params, preset=args.preset, variant=variant, overrides=args.overrides).credit.mode
        for variant in spec.variants
    }
    command = "prefect deployment run tpgrpo/ablation" + (f" --param study={args.study}" if args.study else "")
    report = build_study_report(
        cfg.ablation.runs_dir,
        spec.variants,
        spec.seeds,
        cfg.ablation.reports_dir,
        name_of=lambda variant, seed: study_run_name(variant, seed, settings),
        reference=spec.reference,
        study=name,
        credit_modes=modes,
        tracking_uri=cfg.tracking.uri if args.parent_run_id else None,
        parent_run_id=args.parent_run_id,
        command=command,
    )
    print(report.markdown)
    print(f"report: {report.markdown_path}")


def cmd_check(args: argparse.Namespace) -> None:
    """Validate params.yaml (with variant and overrides) and print the resolved configuration."""
    cfg = _config(args)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    variants = ", ".join(cfg.variants) or "none"
    source = args.params if args.preset is None else f"{args.params} + {args.preset}"
    print(f"# {source}: valid; variants: {variants}", file=sys.stderr)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "prepare": (cmd_prepare, "write the prompt sets: the synthetic world or an imported one"),
    "pretrain": (cmd_pretrain, "train the embedded tiny SD3 base model"),
    "train": (cmd_train, "fine-tune one variant with GRPO (resumable)"),
    "evaluate": (cmd_evaluate, "evaluate the base model or a variant's trained weights"),
    "report": (cmd_report, "compare the variants' runs: table and plots"),
    "study": (cmd_study, "rebuild a study's report from its runs"),
    "check": (cmd_check, "validate params.yaml and print the resolved configuration"),
}


def _source_override(directory: str) -> str:
    """``--from DIR`` as the ``--set`` it stands for, DIR quoted so that a name YAML would read as
    another type (``null``, ``1``) stays a path."""
    return f"data.source={json.dumps(directory)}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpgrpo",
        description="TurningPoint-GRPO / Flow-GRPO fine-tuning of flow-matching text-to-image models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps --version on one line
    )
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=func.__doc__)
        _add_config_args(p)
        p.set_defaults(func=func)
        if name == "train":
            p.add_argument(
                "--run-name",
                default=None,
                metavar="NAME",
                help="train the variant as the run NAME under runs_dir (default: the variant's name), "
                "e.g. to keep a changed configuration beside the original",
            )
            p.add_argument("--restart", action="store_true", help="discard the run's directory and start over")
            p.add_argument("--parent-run-id", default=None, help="MLflow run to nest this run under (ablations)")
        if name == "prepare":
            p.add_argument(
                "--from",
                dest="overrides",
                action="append",
                type=_source_override,
                metavar="DIR",
                help="import the prompt set in DIR: shorthand for --set data.source=DIR",
            )
        if name == "pretrain":
            p.add_argument("--report", default="reports/base_model.json", help="metrics file (default: %(default)s)")
        if name == "report":
            p.add_argument("--variants", nargs="+", default=None, help="run names to compare (default: pipeline.variants)")
            p.add_argument("--out", default="reports", help="output directory (default: %(default)s)")
            p.add_argument("--parent-run-id", default=None, help="MLflow run to attach the report to")
        if name == "study":
            p.add_argument("--study", default=None, metavar="NAME", help="a name under studies (default: the ablation section)")
            p.add_argument("--parent-run-id", default=None, help="MLflow run to attach the report to")
        if name == "evaluate":
            p.add_argument("--out", default=None, help="write the result as JSON (and a sample grid beside it)")
    return parser


def version_line() -> str:
    """``tpgrpo 0.1.0 (python 3.11.9; torch 2.13.0+cpu, diffusers ...)``: the versions a bug
    report needs, read from package metadata without importing the packages."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    stack = ", ".join(f"{name} {installed(name)}" for name in _STACK)
    return f"tpgrpo {__version__} (python {platform.python_version()}; {stack})"


_STACK = ("torch", "diffusers", "transformers", "peft", "accelerate", "mlflow", "prefect", "dvc")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_console()
    try:
        args.func(args)
    except UserError as exc:
        print(f"tpgrpo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
