"""The `moeforge` command. Sub-commands parse their own flags; `train`/`launch` pass hydra overrides
(key=value) through to conf/. Nothing hydra-shaped gets past launcher/config.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _train(args) -> int:
    from .config import load_job_config

    cfg = load_job_config(args.overrides)
    from moeforge.train.loop import run

    run(cfg)
    return 0


def _launch(args) -> int:
    from .torchrun import launch

    opts = check_launch(args)
    return launch(opts, "moeforge.launcher.cli", ["train", *args.overrides])


def check_launch(args):
    """The config and the layout of a `moeforge launch`, checked before any process starts or any process
    group forms (where the world size is known here: numeric --nproc-per-node and --nnodes)."""
    from moeforge.train.build import check_layout

    from .config import load_job_config
    from .torchrun import options_from_args

    cfg = load_job_config(args.overrides)
    opts = options_from_args(args)
    if str(opts.nproc_per_node).isdigit() and str(opts.nnodes).isdigit():
        nproc = int(opts.nproc_per_node)
        check_layout(cfg, nproc * int(opts.nnodes), nproc)
    return opts


def _data_prepare(args) -> int:
    from moeforge.train.data import prepare

    prepare(args.input, args.output, args.val_fraction)
    return 0


def _report(args) -> int:
    from moeforge.train.report import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _doctor(args) -> int:
    from .doctor import doctor

    return doctor(args.nproc_per_node)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeforge", description="Pretrain DeepSeek-V3-style MoE models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run one rank's training job (what torchrun/srun start)")
    t.add_argument("overrides", nargs="*", help="hydra overrides, e.g. model=tiny train.steps=50")
    t.set_defaults(fn=_train)

    la = sub.add_parser("launch", help="start a torchrun job (single or multi-node) running `moeforge train`")
    from .torchrun import add_launch_arguments

    add_launch_arguments(la)
    la.add_argument("overrides", nargs="*", help="hydra overrides passed to every rank")
    la.set_defaults(fn=_launch)

    d = sub.add_parser("data", help="corpus tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="tokenize a folder of text files into memory-mapped token files")
    dp.add_argument("--input", default=None, help="folder of text files (default: the Python standard library)")
    dp.add_argument("--output", default="data/stdlib", help="output folder (default: data/stdlib)")
    dp.add_argument("--val-fraction", type=float, default=0.01)
    dp.set_defaults(fn=_data_prepare)

    r = sub.add_parser("report", help="render loss/throughput PNGs from RUN_DIR/metrics.jsonl")
    r.add_argument("run_dir")
    r.set_defaults(fn=_report)

    doc = sub.add_parser("doctor", help="environment and GPU preflight (NVML)")
    doc.add_argument("--nproc-per-node", type=int, default=None)
    doc.set_defaults(fn=_doctor)

    from .ckpt import add_ckpt_parser
    from .plan import add_plan_parser
    from .slurm import add_slurm_parser

    add_plan_parser(sub)
    add_ckpt_parser(sub)
    add_slurm_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("MOEFORGE_LOG", "INFO"), format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from .config import ConfigError

    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"moeforge: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # layout/config values that are well-typed but invalid
        if args.command not in ("launch", "ckpt"):
            raise
        print(f"moeforge: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
