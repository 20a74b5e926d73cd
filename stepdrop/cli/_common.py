"""What the subcommands share: the help formatter, the model and device flags, loading."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: …)" only where it informs: not for flags, None or "" (the help text says
    what their absence means), nor where the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default in (None, "") or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="name of a model shipped with stepdrop (default: the first one)")
    src.add_argument("--checkpoint", default=None, help="a training checkpoint or exported model file")


def add_device_and_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:N]'")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_compile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", choices=("none", "channels_last", "inductor"), default="none",
                   help="how the model runs: as loaded, as a channels-last copy (faster convolutions on the CPU), or "
                        "that copy compiled by torch.compile/TorchInductor (tens of seconds once per batch shape, "
                        "reported apart from sampling time)")


def ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def load_model(args: argparse.Namespace):
    """The model of --checkpoint, or the shipped model --model (default: the first one)."""
    from stepdrop._validation import check_device
    from stepdrop.checkpoint import load_checkpoint, load_pretrained, pretrained_names

    check_device("--device", args.device)  # before any file is read

    if args.checkpoint is not None:
        return load_checkpoint(args.checkpoint, map_location=args.device)
    names = pretrained_names()
    if args.model is None and not names:
        raise ValueError("no model is shipped with this installation: pass --checkpoint PATH")
    return load_pretrained(args.model or names[0], map_location=args.device)


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def clip_setting(clip: float) -> float | None:
    """--clip as the library takes it: None for 0 (no clipping)."""
    if not clip >= 0:
        raise ValueError(f"--clip must be >= 0 (0: no clipping), got {clip}")
    return clip or None
