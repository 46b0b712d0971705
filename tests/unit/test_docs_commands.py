"""The docs run as written: every shell command of README.md and docs/*.md.

Each command of a ```bash / ```sh block (and each `$ ` line of a ```console block) is one of:
- **run** here, as written, in a scratch copy of what it reads (`RUN`): it must exit 0 and leave the checkout's
  `git status` unchanged (nothing written outside git-ignored folders);
- **validated** (`VALIDATE`): a training launch (torchrun, N ranks, the full step count) is too long for a test,
  so its arguments are resolved and validated as the trainer does before any process group starts (`python -m
  m2megatron.config ARGS --world-size N`), which is where a setting conflict surfaces;
- **skipped** with its reason (`SKIP`): it needs a GPU, the network, a multi-node Slurm cluster, or a user's own
  files (placeholders such as CKPT), or another test runs it as written (named).

Independently of the class, every command that starts one of our programs is checked against that program's
own `--help`: each `--option` it shows exists, an option the docs show in `[brackets]` is optional, and commands
start the project's interpreter (`.venv/bin/python`, `.venv/bin/torchrun`) rather than a bare `python`.
A command no rule claims fails the test: a new command in the docs must be runnable or say why not.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.distributed as dist

from m2megatron.parallel import shutdown

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
COMMAND_LINE = re.compile(r"^(?:\w+=\S+ )*(?:\.venv/bin/)?(?:python3?|torchrun|pytest) |^make \w")
"""In a block without a language, the lines that are commands (the rest is output, trees, tables)."""
INLINE_SYNOPSIS = re.compile(r"`((?:\.venv/bin/)?python -m m2megatron\.[\w.]+ [^`]*|tools/\w+\.py [^`]*)`")
"""A command synopsis in running text or a table: checked against its program's --help, never run."""
PLACEHOLDER = re.compile(r"<[^>]+>|\[|…|\.\.\.|\b[A-Z][A-Z_]{1,}\b(?!=)")
"""A user's value to fill in: <run>, [--opt V], …, or an upper-case name such as CKPT, SRC, OUT (not VAR=)."""


@dataclass(frozen=True)
class DocCommand:
    page: str
    line: int
    text: str
    fence: str = ""
    """The block's info string after the language (`tested`: another test runs the block as written)."""

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def doc_commands(path: Path) -> list[DocCommand]:
    """The commands of a page's shell blocks, comments dropped and continuation lines joined."""
    out, fence, pending, start = [], None, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            info = stripped[3:].split()
            fence, extra = (None, "") if fence is not None else ((info or [""])[0], " ".join(info[1:]))
            continue
        if fence is None:
            out += [DocCommand(str(path.relative_to(REPO)), number, m.group(1), "synopsis")
                    for m in INLINE_SYNOPSIS.finditer(line)]
            continue
        if fence == "" and not (pending or COMMAND_LINE.match(stripped)):
            continue
        if fence not in SHELL_BLOCKS | {""} or not stripped or stripped.startswith("#"):
            continue
        if fence == "console":
            if not (pending or stripped.startswith("$ ")):
                continue
            stripped = stripped.removeprefix("$ ")
        if not pending:
            start = number
        pending += re.sub(r"\s+#\s.*$", "", stripped).removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            out.append(DocCommand(str(path.relative_to(REPO)), start, pending.strip(), extra))
            pending = ""
    return out


ALL = [c for page in PAGES for c in doc_commands(page)]


# ---- what each command is -------------------------------------------------------------------------------
SKIP = [
    (r"^tested$", "the page's `tested` blocks run as written in their own test (docs/EVAL.md: "
                  "tests/distributed/test_eval_docs.py)"),
    (r"^make (demo|test)\b", "the README's own two commands: CI runs `make test`, and `make demo` is the main job"),
    (r"^make gpu-", "needs a GPU host (tests/gpu/run.sh's rehearsal runs on CPU in tests/unit/test_gpu_scripts.py)"),
    (r"^(?:\w+=\S+ )*bash tests/gpu/", "needs a GPU host (rehearsed in tests/unit/test_gpu_scripts.py)"),
    (r"--device cuda\b", "needs a GPU host (its own Python, not this .venv)"),
    (r"\bsbatch\b|\bsrun\b|launch\.submit\b(?!.*--dry-run)",
     "submits to a Slurm cluster (tests/slurm runs the templates)"),
    (r"launch\.submit\b.*--dry-run", "the submit helper's dry run of a 256-GPU recipe (~20 s, every rank class): "
                                      "tests/unit/test_launch_submit.py runs its dry run, test_dry_run.py the recipe"),
    (r"tools/bench_", "a benchmark: minutes of CPU, run by hand (docs/PERFORMANCE.md)"),
    (r"^pip |pip install", "installs packages (network)"),
    (r"/data/|\.ckpt\b|runs/big\b|\bsp\.model\b|corpus\.txt", "reads a user's own data, checkpoint or tokenizer"),
    (r"\bruns/tiny\b", "reads the main job's run directory: docs/EVAL.md's `tested` blocks run the same launchers "
                     "on it"),
    (r"m2-10b_h100_256\.yaml.*--all-ranks", "builds every rank class of a 256-GPU layout (~20 s): "
                                           "tests/unit/test_dry_run.py runs it"),
    (r"bilingual_mixture", "the toy mixture recipe: tests/distributed/test_data_mixture_recipe.py writes its shards, "
                           "dry-runs it and trains it"),
    (r"tools/plan_layout\.py --(config|gpus)", "searches every 256-GPU layout (~20 s): tests/unit/test_stage_split.py "
                                               "and test_planning.py run it"),
]
VALIDATE = re.compile(r"^(?:OMP_NUM_THREADS=\d+ )?(?:\.venv/bin/)?torchrun .*-m m2megatron\.train\b")
RUN = [
    r"-m m2megatron\.config\b",
    r"tools/plan_memory\.py",
    r"tools/train_tokenizer\.py --synthetic",
    r"-m m2megatron\.train --dry-run",
]


def classify(command: DocCommand) -> tuple[str, str]:
    if command.fence == "tested":
        return "skip", SKIP[0][1]
    if command.fence == "synopsis":
        return "skip", "a synopsis in running text: its options are checked against the program's --help"
    for pattern, reason in SKIP[1:]:
        if re.search(pattern, command.text):
            return "skip", reason
    if VALIDATE.search(command.text):
        return "validate", ""
    if PLACEHOLDER.search(command.text.split(" ", 1)[-1]):
        return "skip", "placeholders for a user's own files or values"
    if any(re.search(p, command.text) for p in RUN):
        return "run", ""
    return "unclaimed", ""


def test_every_command_is_run_validated_or_skipped_with_a_reason():
    unclaimed = [str(c) for c in ALL if classify(c)[0] == "unclaimed"]
    assert not unclaimed, "docs commands that no rule of this test runs or explains:\n" + "\n".join(unclaimed)


# ---- the project's interpreter ----------------------------------------------------------------------------
BARE = re.compile(r"(?:^|[;&|]\s*|^\S+=\S+\s+)(python3?|torchrun|pytest)\b")


ACTIVATE = "source .venv/bin/activate"


def test_commands_start_the_project_interpreter():
    """A bare python/torchrun is fine on a page that says to activate the venv first."""
    activated = {str(p.relative_to(REPO)) for p in PAGES if ACTIVATE in p.read_text(encoding="utf-8")}
    bare = [str(c) for c in ALL if BARE.search(c.text) and "-m venv" not in c.text and c.page not in activated
            and c.fence != "synopsis" and "GPU host" not in classify(c)[1]]
    assert not bare, ("commands that start a bare python/torchrun/pytest on a page that does not say "
                      f"`{ACTIVATE}` (a fresh shell has no venv active):\n" + "\n".join(bare))


# ---- options against the programs' own --help ---------------------------------------------------------------
def split_program(command: DocCommand) -> tuple[str, str, str] | None:
    """(kind, name, the arguments' text) of the m2megatron program a command starts ('module' with `-m NAME`, or
    'script' with tools/NAME.py), else None."""
    match = re.search(r"-m (m2megatron[\w.]*)|(tools/\w+\.py)", command.text)
    if match is None:
        return None
    kind, name = ("module", match.group(1)) if match.group(1) else ("script", match.group(2))
    return kind, name, command.text[match.end():]


def program(command: DocCommand) -> tuple[str, str] | None:
    found = split_program(command)
    return found[:2] if found else None


def help_text(kind: str, name: str, subcommand: str | None = None) -> str:
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [name, *([subcommand] if subcommand else []), "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), \
                pytest.raises(SystemExit):
            if kind == "module":
                runpy.run_module(name, run_name="__main__", alter_sys=False)
            else:
                runpy.run_path(str(REPO / name), run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


def documented_options(command: DocCommand) -> tuple[set[str], set[str]]:
    """(every --option the command shows after its program, those shown inside [brackets]); dotted config overrides
    excluded."""
    text = split_program(command)[2]
    optional, depth, shown = set(), 0, set()
    for token in re.findall(r"\[|\]|--[A-Za-z][\w-]*(?:\.[\w.]+)?", text):
        if token == "[":
            depth += 1
        elif token == "]":
            depth = max(0, depth - 1)
        elif "." not in token:
            shown.add(token)
            if depth:
                optional.add(token)
    return shown, optional


def usage_required(help_out: str) -> set[str]:
    """Options argparse lists outside brackets in its usage line (the required ones)."""
    usage = help_out.split("\n\n", 1)[0]
    depth, required = 0, set()
    for token in re.findall(r"\[|\]|--[A-Za-z][\w-]*", usage):
        if token == "[":
            depth += 1
        elif token == "]":
            depth -= 1
        elif depth == 0:
            required.add(token)
    return required


FOREIGN_OPTIONS = {
    "m2megatron.eval.clip_benchmark_adapter": "its options are CLIP_benchmark's own CLI, which needs torchvision "
                                              "(not installable beside the CPU torch build)",
}
PROGRAMS = sorted({p for c in ALL if (p := program(c)) is not None and p[1] not in FOREIGN_OPTIONS})


@pytest.mark.parametrize("kind,name", PROGRAMS, ids=[n for _, n in PROGRAMS])
def test_documented_options_exist_and_brackets_mean_optional(kind, name):
    commands = [c for c in ALL if program(c) == (kind, name)]
    first_word = split_program(commands[0])[2].split()[:1]
    subcommand = first_word[0] if first_word and not first_word[0].startswith(("-", "<", "[")) and \
        not re.search(r"[./]", first_word[0]) else None
    help_out = help_text(kind, name, subcommand)
    assert "usage:" in help_out, f"{name} --help printed no usage"
    required = usage_required(help_out)
    problems = []
    for command in commands:
        shown, optional = documented_options(command)
        problems += [f"{command}: {opt} is not an option of {name}" for opt in sorted(shown)
                     if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", help_out)]
        problems += [f"{command}: {opt} is shown as optional but {name} requires it"
                     for opt in sorted(optional & required)]
    assert not problems, "\n".join(problems)


# ---- runnable and validated commands ---------------------------------------------------------------------------
def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                          text=True).stdout


def _in_process(kind: str, name: str, args: list[str]) -> tuple[int, str]:
    """Run `python -m NAME ARGS` or `python NAME ARGS` in this process: the exit status and stderr."""
    err, saved = io.StringIO(), sys.argv
    sys.argv = [name, *args]
    code = 0
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            if kind == "module":
                runpy.run_module(name, run_name="__main__", alter_sys=False)
            else:
                runpy.run_path(name, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
        if dist.is_initialized():  # a process would exit here; later tests of this worker need a clean slate
            shutdown()
    return code, err.getvalue()


RUNNABLE = [c for c in ALL if classify(c)[0] == "run"]


@pytest.mark.parametrize("command", RUNNABLE, ids=[f"{c.page}:{c.line}" for c in RUNNABLE])
def test_runnable_commands_run_as_written(command, monkeypatch):
    monkeypatch.chdir(REPO)
    before = _git_status()
    kind, name, args = split_program(command)
    code, err = _in_process(kind, name, shlex.split(args))
    expected_error = "# error:" in _following_comment(command)
    assert (code != 0) == expected_error, f"{command} exited {code}: {err.strip()[-2000:]}"
    assert _git_status() == before, f"{command} wrote files into the checkout"


def _following_comment(command: DocCommand) -> str:
    """The comment lines right after a command in its page (docs show an expected error as `# error: …`)."""
    lines = (REPO / command.page).read_text(encoding="utf-8").splitlines()[command.line:]
    comments = []
    for line in lines:
        if not line.strip().startswith("#"):
            break
        comments.append(line.strip())
    return "\n".join(comments)


VALIDATED = [c for c in ALL if classify(c)[0] == "validate"]


@pytest.mark.parametrize("command", VALIDATED, ids=[f"{c.page}:{c.line}" for c in VALIDATED])
def test_training_launches_resolve_and_validate(command, monkeypatch):
    monkeypatch.chdir(REPO)
    words = shlex.split(command.text)
    nproc = next((int(w.split("=", 1)[1]) for w in words if w.startswith("--nproc-per-node=")), None)
    if nproc is None:
        nproc = int(words[words.index("--nproc-per-node") + 1])
    args = words[words.index("m2megatron.train") + 1:]
    code, err = _in_process("module", "m2megatron.config", [*args, "--world-size", str(nproc)])
    assert code == 0, f"{command}: the config does not validate on {nproc} ranks: {err.strip()}"
