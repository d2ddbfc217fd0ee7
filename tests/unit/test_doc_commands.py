"""Every `moeforge ...` command shown in README.md and docs/ runs as written.

Each command is taken from the Markdown (code blocks and inline code, `\\` continuations joined,
comments dropped) and checked the way the command itself would check it before starting anything:
- train: the config composes and its layout is valid for one process;
- launch: the config composes and its layout is valid for --nproc-per-node x --nnodes ranks;
- slurm submit: the batch script renders (--dry-run) for --nodes x --gpus-per-node ranks;
- plan: the planner runs to its table;
- dryrun: the config composes, and the rank and the layout are valid for the world (not the run itself:
  tests/e2e/test_dryrun.py runs it);
- everything else (data, report, doctor, ckpt, slurm status/cancel, which need files or a cluster): the
  arguments parse.
A synopsis (a line with [optional], a|b or UPPERCASE placeholders), or inline code that only mentions a
verb or a flag, is checked only for its verb.
"""
import re
import shlex
from pathlib import Path

import pytest

from moeforge.launcher import dryrun
from moeforge.launcher.cli import build_parser, check_launch
from moeforge.launcher.config import load_job_config
from moeforge.train.build import check_layout

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"(^|[\s=/])[A-Z][A-Z_]{1,}([\s:/]|$)")  # PATH, RUN_DIR, HF_DIR, N (not P)


def _commands(text: str) -> list[str]:
    lines, out, in_block = [], [], False
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            lines.append(raw)
        else:  # inline code: a command when it sets something; else a mention (`moeforge launch --nnodes 2`)
            lines += [c if "=" in c else f"{c} [mention]" for c in re.findall(r"`([^`]*moeforge [^`]*)`", raw)]
    joined = "\n".join(lines).replace("\\\n", " ")
    for line in joined.splitlines():
        m = re.search(r"(?:^|\s|&&\s*)(?:\.venv/bin/)?(moeforge\s+[a-z].*)$", line)
        if not m:
            continue
        cmd = m.group(1).split("&&")[0]
        cmd = re.sub(r"\s#.*$", "", cmd).strip()
        out.append(cmd)
    return out


def all_commands() -> list[tuple[str, str]]:
    seen, out = set(), []
    for path in DOCS:
        for cmd in _commands(path.read_text()):
            if cmd not in seen:
                seen.add(cmd)
                out.append((path.name, cmd))
    return out


COMMANDS = all_commands()
VERBS = {"train", "launch", "data", "report", "doctor", "plan", "ckpt", "slurm", "dryrun"}


def is_synopsis(cmd: str) -> bool:
    return any(c in cmd for c in "[|") or bool(PLACEHOLDER.search(cmd))


def test_the_docs_show_commands():
    """The extractor finds the README's main command and the documented verbs (so the test below is not
    vacuously green)."""
    cmds = [c for _, c in COMMANDS]
    assert "moeforge launch --nproc-per-node 4 experiment=cpu4" in cmds
    assert {c.split()[1] for c in cmds} >= VERBS - {"report"} | {"launch", "plan", "slurm", "train"}
    assert sum(not is_synopsis(c) for c in cmds) >= 20, cmds


@pytest.mark.parametrize("where,cmd", COMMANDS, ids=[c for _, c in COMMANDS])
def test_command_runs_as_written(where, cmd, capsys):
    argv = shlex.split(cmd)[1:]
    assert argv and argv[0] in VERBS, f"{where}: unknown verb in {cmd!r}"
    if is_synopsis(cmd):
        return
    if argv[-1] == "...":  # "and the rest of your overrides": check what is written
        argv = argv[:-1]
    if argv[0] == "dryrun":  # its own parser (a process of its own: launcher/dryrun.py)
        dryrun.check(dryrun.parse(argv[1:]))
        return
    args = build_parser().parse_args(argv)
    verb = argv[0]
    if verb == "train":
        check_layout(load_job_config(args.overrides), 1, 1)
    elif verb == "launch":
        check_launch(args)
    elif verb == "plan":  # exit 1: a verdict of "does not fit", which the docs show on purpose
        assert args.fn(args) in (0, 1), f"{where}: {cmd}\n{capsys.readouterr().err}"
        out = capsys.readouterr().out
        assert "verdict:" in out or "layouts fit" in out, out  # one layout's verdict, or --search's count
    elif verb == "slurm" and args.slurm_command == "submit":
        args.dry_run = True
        assert args.fn(args) == 0, f"{where}: {cmd}\n{capsys.readouterr().err}"
        assert "#SBATCH" in capsys.readouterr().out


def test_a_bad_layout_is_caught():
    """The check above can fail: ep=3 does not divide 4 ranks, and ep=4 needs 4 ranks, not 1."""
    with pytest.raises(ValueError, match="ep"):
        check_launch(build_parser().parse_args(["launch", "--nproc-per-node", "4", "parallel.ep=3"]))
    with pytest.raises(ValueError, match="ep"):
        check_layout(load_job_config(["parallel.ep=4"]), 1, 1)


LAYOUTS = [(n, extra) for n in (1, 2, 4) for extra in ([], ["model=tiny"], ["parallel.ep=2"], ["parallel.pp=2"])
           if n > 1 or not extra or not extra[0].startswith("parallel.")]  # pp=2 / ep=2 need 2 ranks


@pytest.mark.parametrize("nproc,extra", LAYOUTS, ids=[f"{n}-{' '.join(e) or 'defaults'}" for n, e in LAYOUTS])
def test_defaults_work_at_1_2_4_ranks(nproc, extra):
    """The default config, alone or with one parallel degree set, is a valid job at 1, 2 and 4 ranks."""
    check_launch(build_parser().parse_args(["launch", "--nproc-per-node", str(nproc), *extra]))
