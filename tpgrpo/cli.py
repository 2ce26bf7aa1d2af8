"""The ``tpgrpo`` command. Every subcommand reads params.yaml through :mod:`tpgrpo.config`.

Errors that a user can fix (bad params, missing files) print one line to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import yaml

from tpgrpo.config import ExperimentConfig, load_config
from tpgrpo.errors import UserError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="experiment file (default: %(default)s)")
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
    return load_config(args.params, variant=args.variant, overrides=args.overrides)


def cmd_prepare(args: argparse.Namespace) -> None:
    """Generate the synthetic prompt sets (data.dir/train.jsonl, data.dir/test.jsonl).

    Test prompts are held-out combinations: each contains a colour-shape pair that never occurs
    in the training prompts (nor in the images the base model is pretrained on).
    """
    from tpgrpo.world import load_prompts, write_prompt_sets

    cfg = _config(args)
    paths = write_prompt_sets(cfg.data.dir, cfg.data.num_train, cfg.data.num_test, cfg.data.seed)
    for split, path in (("train", paths.train), ("test", paths.test)):
        print(f"{split}: {len(load_prompts(path))} prompts -> {path}")


def cmd_check(args: argparse.Namespace) -> None:
    """Validate params.yaml (with variant and overrides) and print the resolved configuration."""
    cfg = _config(args)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    variants = ", ".join(cfg.variants) or "none"
    print(f"# {args.params}: valid; variants: {variants}", file=sys.stderr)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "prepare": (cmd_prepare, "generate the synthetic prompt sets"),
    "check": (cmd_check, "validate params.yaml and print the resolved configuration"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpgrpo",
        description="TurningPoint-GRPO / Flow-GRPO fine-tuning of flow-matching text-to-image models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=func.__doc__)
        _add_config_args(p)
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"tpgrpo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
