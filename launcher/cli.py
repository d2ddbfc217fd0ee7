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


def _data_errors(fn):
    """A data verb's bad input (a malformed line, a missing file) ends in one line that names it."""

    def run(args) -> int:
        try:
            return fn(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"moeforge: {e}", file=sys.stderr)
            return 2

    return run


@_data_errors
def _data_prepare(args) -> int:
    from moeforge.train.prepare import prepare

    prepare(args.input, args.tokenizer, args.output, workers=args.workers, text_key=args.text_key,
            fim_rate=args.fim_rate, seed=args.seed)
    return 0


@_data_errors
def _data_train_tokenizer(args) -> int:
    from moeforge.train.prepare import documents
    from moeforge.train.tokenizer import train_tokenizer

    skipped = []
    tok = train_tokenizer(documents(args.input, args.text_key, skipped), args.vocab_size, args.output, progress=True)
    print(f"{args.output}: byte-level BPE, {tok.vocab_size} ids, eod {tok.eod}"
          + (f" ({len(skipped)} files that are not UTF-8 skipped)" if skipped else ""))
    return 0


@_data_errors
def _data_info(args) -> int:
    from moeforge.train.prepare import describe

    info = describe(args.prefix)
    meta = info.pop("meta") or {}
    for key, value in {**info, **{k: v for k, v in meta.items() if k not in ("sources", "skipped")}}.items():
        print(f"{key}: {value}")
    if meta:
        print(f"sources: {len(meta['sources'])} files ({len(meta['skipped'])} skipped)")
    return 0


def _dryrun(argv: list[str]) -> int:
    """In its own process: the fake CUDA library must be loaded before torch (launcher/dryrun.py). Its
    flags are the dry run's own (train/dryrun.py add_arguments), so they pass through unparsed."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "moeforge.launcher.dryrun", *argv])


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
    inputs = dict(nargs="+", default=None, metavar="PATH", help="folders of .py/.txt/.md/.rst files, .jsonl, "
                  ".jsonl.gz, .jsonl.zst or .parquet files (default: the Python standard library)")
    dp = dsub.add_parser("prepare", help="tokenize text into a megatron-core IndexedDataset PREFIX.bin/.idx/.json")
    dp.add_argument("--input", **inputs)
    dp.add_argument("--tokenizer", required=True, help="`bytes`, a shipped name (stdlib-bpe-4096), a tokenizer.json "
                    "or a Hugging Face tokenizer folder")
    dp.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    dp.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    dp.add_argument("--text-key", default="text", help="the text field of .jsonl / column of .parquet (default text)")
    dp.add_argument("--fim-rate", type=float, default=0.0, help="share of documents in Fill-in-the-Middle form")
    dp.add_argument("--seed", type=int, default=0, help="seed of the FIM draws")
    dp.set_defaults(fn=_data_prepare)
    dt = dsub.add_parser("train-tokenizer", help="train a byte-level BPE with DeepSeek's special tokens (a tokenizer.json)")
    dt.add_argument("--input", **inputs)
    dt.add_argument("--vocab-size", type=int, required=True)
    dt.add_argument("--output", required=True, metavar="FILE.json")
    dt.add_argument("--text-key", default="text")
    dt.set_defaults(fn=_data_train_tokenizer)
    di = dsub.add_parser("info", help="check a prepared PREFIX.bin/.idx (ours or Megatron-LM's) and summarize it")
    di.add_argument("prefix")
    di.set_defaults(fn=_data_info)

    dr = sub.add_parser("dryrun", add_help=False,
                        help="one rank of any layout on a fake GPU: memory by category, host syncs per step "
                             "(moeforge dryrun --help)")
    dr.set_defaults(fn=lambda args: _dryrun([]))

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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dryrun"]:
        return _dryrun(argv[1:])
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
