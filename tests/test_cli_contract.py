"""The command-line contract, on the real ``vargpt-mlx`` in a subprocess (not CliRunner).

A user mistake (a bad value, a missing / unwritable / corrupt path) gives exit code 2, exactly one
``error: ...`` line on stderr, no traceback, and leaves no file or directory behind; it is found
before any model is loaded. Anything else is a bug: one ``internal error`` line, exit 1.

``test_every_option_rejects_bad_values`` walks every command and option of the typer app itself
and feeds each bad values of its kind (hypothesis draws the numbers); a new option without an
entry in ``DOMAINS`` fails it, so the rule cannot be forgotten. The read-only cases hold as root:
paths under a regular file, ``/proc``, and ``chattr +i`` where the file system supports it.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import CKPT, FIXTURES, TINY_TOKENIZER
from vargpt_mlx.cli.main import app

WORKERS = 4


# ------------------------------------------------------------------------------------------ running
def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VARGPT_MODEL", "VARGPT_MLX_DEBUG", "COLUMNS")}
    env.update(VARGPT_MLX_NO_OPENBLAS="1", HF_HUB_OFFLINE="1", HF_HOME=str(home / ".hf"), OPENBLAS_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    return env


def cli(args, cwd: Path, env: dict | None = None, timeout: float = 120, umask: int | None = None):
    """``vargpt-mlx ARGS`` in a subprocess (stdin closed, stdout / stderr pipes: not a terminal)."""
    return subprocess.run([sys.executable, "-m", "vargpt_mlx.cli.main", *map(str, args)], cwd=cwd,
                          env={**_env(cwd), **(env or {})}, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (hidden ones too): new files or directories are partial output."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_user_error(r, *fragments, before: set[str] | None = None, root: Path | None = None):
    where = f"args: {r.args[3:]}\nstdout: {r.stdout[-500:]}\nstderr: {r.stderr[-2000:]}"
    assert r.returncode == 2, where
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), where
    assert "Traceback" not in r.stderr + r.stdout, where
    assert ".tmp" not in lines[0] and ".probe" not in lines[0], where  # the user's paths, not temp names
    for f in fragments:
        assert f in lines[0], (f, where)
    if before is not None:
        assert tree(root) == before, (sorted(tree(root) ^ before), where)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A working directory: the fixture model, data, odd files (never modified by the cases)."""
    w = tmp_path_factory.mktemp("contract")
    model = w / "model"
    model.mkdir()
    for src in list(CKPT.iterdir()) + list(TINY_TOKENIZER.iterdir()):
        shutil.copy(src, model / src.name)
    (w / "afile").write_text("a regular file")
    (w / "emptydir").mkdir()
    (w / "corrupt.png").write_bytes(os.urandom(600))
    (w / "corrupt.json").write_text("{not json")
    (w / "corrupt.safetensors").write_bytes(os.urandom(600))
    broken = w / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(w / "img.png")
    (w / "data.json").write_text('[{"messages": [{"role": "user", "content": "hi"}, '
                                 '{"role": "assistant", "content": "hello"}]}]')
    (w / "dpo.json").write_text('[{"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."}]')
    (w / "refs").mkdir()
    for name in ("refs.safetensors", "refs.json"):
        shutil.copy(FIXTURES / name, w / "refs" / name)
    (w / "adapters").mkdir()
    (w / "up").mkdir()
    return w


# ------------------------------------------------------------------------------------------ basics
def test_version_and_help_without_type_labels(work):
    r = cli(["--version"], work)
    assert r.returncode == 0 and r.stdout.strip() == "vargpt-mlx 0.1.0"
    paths = [" ".join(p) for p, _ in _commands()]
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda p: cli([*p.split(), "--help"], work), paths))
    for path, r in zip(paths, results):
        assert r.returncode == 0 and "--help" in r.stdout, (path, r.stderr)
        for label in ("<bool>", "<str>", "<int>", "<float>", "<path>", "list["):
            assert label not in r.stdout, (path, label)


def test_usage_errors_are_one_line(work):
    before = tree(work)
    for args in (["generate", "x", "--n", "abc"], ["generate"], ["no-such-command"], ["chat", "--bogus"]):
        assert_user_error(cli(args, work), before=before, root=work)


def test_internal_error_is_one_line_exit_1_and_debug_shows_the_traceback(work):
    boom = ("import sys, vargpt_mlx.files as f\n"  # a bug inside a check: not a user error
            "def broken(*a, **k):\n    raise ZeroDivisionError('boom')\n"
            "f.check_safetensors = broken\n"
            "from vargpt_mlx.cli.main import main\n"
            "sys.argv = ['vargpt-mlx', 'verify', '-m', 'model', '--refs', 'refs/refs.safetensors']\nmain()\n")
    r = subprocess.run([sys.executable, "-c", boom], cwd=work, env=_env(work), capture_output=True, text=True,
                       timeout=60)
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("internal error") and "ZeroDivisionError: boom" in lines[0] and "--debug" in lines[0]
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-c", boom], cwd=work, env={**_env(work), "VARGPT_MLX_DEBUG": "1"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" in r.stderr and "ZeroDivisionError" in r.stderr


# ------------------------------------------------------------------------------------------ the items
def _immutable_dir(root: Path) -> Path | None:
    """A directory even root cannot write into (``chattr +i``), where the file system allows it."""
    d = root / "immutable"
    d.mkdir(exist_ok=True)
    if shutil.which("chattr") is None:
        return None
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        return None
    try:
        (d / "x").write_text("x")
    except OSError:
        return d
    (d / "x").unlink()
    subprocess.run(["chattr", "-i", str(d)], capture_output=True)
    return None


@pytest.fixture
def immutable(tmp_path):
    d = _immutable_dir(tmp_path)
    yield d
    if d is not None:
        subprocess.run(["chattr", "-i", str(d)], capture_output=True)


def _unwritable(work: Path, immutable: Path | None) -> list[tuple[str, str]]:
    """(directory that cannot be written, expected words): hold as root."""
    cases = [("afile", "not a directory"), ("/proc", "cannot write"), ("missing", "does not exist")]
    if immutable is not None:
        cases.append((str(immutable), "cannot write"))
    return cases


def test_train_adapter_path_checked_before_loading(work, immutable):
    """Unwritable adapter paths fail at once (the broken model would fail if it were loaded first);
    --iters 0 leaves no adapter directory."""
    before = tree(work)
    for parent, words in _unwritable(work, immutable):
        r = cli(["train", "sft", "-m", "broken_model", "--data", "data.json", "--adapter-path", f"{parent}/ad",
                 "--iters", 1], work)
        assert_user_error(r, "--adapter-path", words, before=before, root=work)
    r = cli(["train", "sft", "-m", "model", "--data", "data.json", "--adapter-path", "new_adapters", "--iters", 0],
            work)
    assert_user_error(r, "--iters", before=before, root=work)


@pytest.mark.parametrize("cmd", ["generate", "edit", "convert", "fuse", "train", "nano", "chat"])
def test_one_rule_for_output_directories(cmd, work, immutable):
    """Outputs go into existing, writable directories: missing parents are never created, and a
    read-only place is named as the user wrote it, before anything is loaded."""
    before = tree(work)
    for parent, words in _unwritable(work, immutable):
        out = f"{parent}/out"
        args = {"generate": ["generate", "x", "-m", "model", "-o", f"{out}.png"],
                "edit": ["edit", "x", "--image", "img.png", "-m", "model", "-o", f"{out}.png"],
                "convert": ["convert", "model", "-o", out],
                "fuse": ["fuse", "--adapter-path", "adapters", "-m", "model", "-o", out],
                "train": ["train", "sft", "-m", "model", "--data", "data.json", "--adapter-path", out],
                "nano": ["train", "nano", "-o", out],
                "chat": ["chat", "hi", "-m", "model", "--out-dir", parent]}[cmd]
        r = cli(args, work)
        assert_user_error(r, words, parent.split("/")[0] if cmd != "chat" else parent, before=before, root=work)


def test_output_pngs_follow_the_umask_and_lines_are_not_wrapped(work, tmp_path):
    prompt = "a long prompt " * 12 + "end"
    r = cli(["generate", prompt, "-m", work / "model", "-o", "o.png", "--seed", 7, "--aspect", "3:2"], tmp_path,
            umask=0o027)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.png").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600
    assert f"generate: {prompt}\n" in r.stdout  # one line although longer than 80 columns
    assert "seed 7" in r.stdout and r.stderr == ""
    assert sorted(os.listdir(tmp_path)) == [".hf", "o.png"] or sorted(os.listdir(tmp_path)) == ["o.png"]
    with Image.open(tmp_path / "o.png") as im:
        assert im.width > im.height  # 3:2 is landscape
        assert im.text["seed"] == "7" and im.text["prompt"] == prompt


def test_aspect_is_width_to_height_only(work):
    before = tree(work)
    for args in (["generate", "x", "-m", "model", "--aspect", "1.5"],
                 ["train", "sft", "-m", "model", "--data", "data.json", "--adapter-path", "ad", "--gen-aspect", "2"]):
        assert_user_error(cli(args, work), "W:H", before=before, root=work)


def test_verify_refs_checked_before_loading(work):
    before = tree(work)
    assert_user_error(cli(["verify", "-m", "model", "--refs", "corrupt.safetensors"], work), "not a safetensors",
                      before=before, root=work)
    assert_user_error(cli(["verify", "-m", "model", "--refs", "data.json"], work), "not a safetensors",
                      before=before, root=work)
    (work / "norefs").mkdir(exist_ok=True)
    shutil.copy(work / "refs" / "refs.safetensors", work / "norefs" / "refs.safetensors")
    before = tree(work)
    assert_user_error(cli(["verify", "-m", "model", "--refs", "norefs/refs.safetensors"], work), "refs.json",
                      before=before, root=work)


def test_mistyped_relative_model_path_does_not_exist(work):
    (work / "mymodels").mkdir(exist_ok=True)
    before = tree(work)
    for m in ("mymodels/x", "nomodels/x"):
        r = cli(["generate", "x", "-m", m, "-o", "o.png"], work)
        assert_user_error(r, f"model path {m} does not exist", before=before, root=work)
    assert "Hugging Face" not in cli(["generate", "x", "-m", "mymodels/x", "-o", "o.png"], work).stderr


def test_huge_image_is_one_clear_error(work, tmp_path):
    Image.new("1", (10000, 10000)).save(tmp_path / "huge.png")  # 100 M pixels, a small file
    before = tree(work)
    for args in (["edit", "x", "--image", tmp_path / "huge.png", "-m", "model", "-o", "o.png"],
                 ["chat", "x", "--image", tmp_path / "huge.png", "-m", "model"]):
        r = cli(args, work)
        assert_user_error(r, "too large", before=before, root=work)
        assert "DecompressionBomb" not in r.stderr


def test_chat_max_tokens_is_bounded(work):
    """Above every checkpoint's context before loading; above the loaded model's context (nano: 4096)
    before the first token."""
    before = tree(work)
    assert_user_error(cli(["chat", "hi", "-m", "broken_model", "--max-tokens", 32769], work),
                      "--max-tokens must be in 1..32768, got 32769", before=before, root=work)
    assert_user_error(cli(["chat", "hi", "-m", "nano", "--max-tokens", 4097], work),
                      "max_tokens must be in 1..4096, the model's context", before=before, root=work)


def test_chat_out_dir_checked_before_loading(work, immutable):
    before = tree(work)
    for parent, words in _unwritable(work, immutable):
        assert_user_error(cli(["chat", "hi", "-m", "broken_model", "--out-dir", parent], work), "--out-dir", words,
                          before=before, root=work)


# ------------------------------------------------------------------------------------------ the walker
def _commands():
    root = typer.main.get_command(app)

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                yield from walk(sub, path + (name,))
        else:
            yield path, cmd

    return list(walk(root, ()))


def _key(param) -> str:
    return param.opts[0] if param.param_type_name == "option" else param.name


# Valid arguments for each command (bad values replace one of them), relative to ``work``.
BASE = {
    "verify": {"--model": "model", "--refs": "refs/refs.safetensors"},
    "convert": {"source": "model", "-o": "conv_out"},
    "quantize": {"source": "model", "-o": "quant_out"},
    "generate": {"prompt": "a red cat", "--model": "model", "--output": "o.png", "--seed": "1"},
    "edit": {"prompt": "make it blue", "--image": "img.png", "--model": "model", "--output": "o.png"},
    "fuse": {"--adapter-path": "adapters", "-o": "fused", "--model": "model"},
    "chat": {"prompt": "hi", "--model": "model", "--max-tokens": "1"},
    "serve": {"--model": "model", "--port": "18765"},
    "train sft": {"--data": "data.json", "--adapter-path": "ad", "--model": "model", "--iters": "1"},
    "train dpo": {"--data": "dpo.json", "--adapter-path": "ad", "--model": "model", "--iters": "1"},
    "train nano": {"-o": "nano_out", "--smoke": None},
    "reference random": {"--upstream": "up", "--sizes": "tiny", "-o": "ref_out"},
    "reference record": {"--upstream": "up", "--model": "model", "-o": "rec_out"},
}

INF = math.inf


def ints(lo=None, hi=None, allowed=()):
    return ("int", lo, hi, tuple(allowed))


def floats(lo=None, hi=None, lo_open=False, hi_open=False):
    return ("float", lo, hi, lo_open, hi_open)


# What each option accepts; anything outside must be refused. Keys: "command option" or "option".
DOMAINS = {
    "--n": ints(1, 1000), "--seed": ints(0, 2**63 - 1), "--top-k": ints(0), "--batch-size": ints(1),
    "--max-tokens": ints(1, 32768), "--port": ints(1, 65535), "--max-queue": ints(0),
    "--max-image-pixels": ints(1), "--iters": ints(1), "--grad-accum": ints(1), "--lora-rank": ints(1),
    "--lora-layers": ints(1, allowed=[-1]), "--steps-per-eval": ints(1), "--val-batches": ints(1, allowed=[-1]),
    "--save-every": ints(1), "--q-bits": ints(2, 8, allowed=[]), "--q-group-size": ints(32, 128),
    "--cfg": floats(0), "--tau": floats(0, lo_open=True), "--top-p": floats(0, 1),
    "chat --top-p": floats(0, 1, lo_open=True), "chat --temp": floats(0), "serve --temp": floats(0, 2),
    "--learning-rate": floats(0, lo_open=True), "--weight-decay": floats(0), "--lora-scale": floats(0, lo_open=True),
    "--lora-dropout": floats(0, 1, hi_open=True), "--beta": floats(0, lo_open=True), "--bit-flip": floats(0, 1),
    "--max-body-mb": floats(0, lo_open=True),
    # words and patterns: bad examples
    "--fine-tune-type": ("bad", ["qlora", "LORA"]), "--optimizer": ("bad", ["sgd"]), "--loss": ("bad", ["hinge"]),
    "--text-loss": ("bad", ["all"]), "--dtype": ("bad", ["f16", "int8"]), "--device": ("bad", ["tpu"]),
    "--rerun": ("bad", ["maybe"]), "--log-level": ("bad", ["loud"]), "--stop-after": ("bad", ["eval", "x"]),
    "--pn": ("bad", ["3M", "-1M"]), "--aspect": ("bad", ["1.5", "0:1"]),
    "--gen-aspect": ("bad", ["2", "x:y"]), "--shard-size": ("bad", ["abc", "-5GB"]),
    "--targets": ("bad", ["llm,bogus", ","]), "--sizes": ("bad", ["bogus=1", "tiny,llm_dim=-3"]),
    "--host": ("bad", ["256.256.256.256"]),
    "prompt": ("bad", ["   "]), "--prompt": ("bad", ["   "]),
    # free text: any value is valid
    "--system": ("free",), "--assistant-prefix": ("free",), "--api-key": ("free",),
    "--python": ("bad", ["no-such-python"]),
    # paths
    "--model": ("model",), "source": ("model",), "verify --model": ("in_dir",),
    "--image": ("in_file",), "--data": ("in_file",), "--val-data": ("in_file",), "--refs": ("in_file",),
    "--inputs-from": ("in_file",), "--annotate": ("in_file",),
    "--tokenizer": ("in_dir",), "--adapter-path": ("in_dir",), "--upstream": ("in_dir",),
    "train sft --adapter-path": ("out_dir",), "train dpo --adapter-path": ("out_dir",),
    "-o": ("out_dir",), "--output": ("out_file",), "--json": ("out_file",), "--out-dir": ("exist_dir",),
}

PATH_BAD = {  # missing, the wrong kind, unwritable or unreadable even for root, corrupt
    "model": ["nowhere/x", "afile", "broken_model"],
    "in_file": ["missing.json", "emptydir", "corrupt.png"],
    "in_dir": ["missing_dir", "afile/x"],
    "out_file": ["missing/o.png", "afile/o.png", "/proc/o.png"],
    "out_dir": ["missing/out", "afile/out", "/proc/out"],
    "exist_dir": ["missing", "afile", "/proc"],
}


def _domain(path: str, key: str):
    return DOMAINS.get(f"{path} {key}", DOMAINS.get(key))


def _bad_value(domain, data) -> str | None:
    """One value outside ``domain`` drawn by hypothesis: a number out of range or of the wrong type,
    a bad word, a missing / wrong-kind / unwritable / corrupt path (``None``: free text)."""
    kind = domain[0]
    if kind == "free":
        return None
    if kind == "bad":
        return data.draw(st.sampled_from(domain[1]))
    if kind in PATH_BAD:
        return data.draw(st.sampled_from(PATH_BAD[kind]))
    wrong_type = st.sampled_from(["x1", "1.5", "", "1,5"] if kind == "int" else ["abc", "1,5", ""])
    if kind == "int":
        _, lo, hi, allowed = domain
        outside = [wrong_type]
        if lo is not None:
            outside.append(st.integers(max_value=lo - 1).filter(lambda v: v not in allowed).map(str))
        if hi is not None:
            outside.append(st.integers(min_value=hi + 1).map(str))
        return data.draw(st.one_of(outside))
    _, lo, hi, lo_open, hi_open = domain
    outside = [wrong_type, st.just("nan")] + ([st.just("inf")] if hi is None else [])
    if lo is not None:
        outside.append(st.floats(max_value=lo, allow_nan=False, exclude_max=not lo_open).map(repr))
    if hi is not None:
        outside.append(st.floats(min_value=hi, allow_nan=False, exclude_min=not hi_open).map(repr))
    return data.draw(st.one_of(outside))


def _params():
    out = []
    for path, cmd in _commands():
        p = " ".join(path)
        for param in cmd.params:
            if getattr(param, "is_flag", False) or param.name == "help":
                continue
            out.append((p, _key(param)))
    return out


def test_every_option_has_a_domain_and_a_description():
    missing = [f"{p} {k}" for p, k in _params() if _domain(p, k) is None]
    assert not missing, f"options without a DOMAINS entry (say what they accept): {missing}"
    assert set(BASE) == {" ".join(p) for p, _ in _commands()}
    undocumented = [f"{' '.join(path)} {_key(p)}" for path, cmd in _commands() for p in cmd.params
                    if p.name != "help" and not (getattr(p, "help", None) or "").strip()]
    assert not undocumented, f"options without help text: {undocumented}"


def _args(path: str, key: str, value: str) -> list[str]:
    base = dict(BASE[path])
    base[key] = value
    args = path.split()
    for k, v in base.items():
        if k in ("prompt", "source"):
            continue
        args += [k] if v is None else [k, v]
    for k in ("prompt", "source"):  # arguments last, after "--" so that values like "-1M" stay values
        if k in base:
            args += ["--", base[k]]
    return args


@settings(max_examples=1, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_option_rejects_bad_values(data, work):
    """Every option of every command, one bad value each (drawn afresh on every run), all run
    as subprocesses side by side: exit 2, one line, no traceback, nothing written."""
    cases = []
    for path, key in _params():
        value = _bad_value(_domain(path, key), data)
        if value is not None:
            cases.append((path, key, value))
    before = tree(work)
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda c: cli(_args(*c), work, timeout=90), cases))
    failures = []
    for (path, key, value), r in zip(cases, results):
        # the line names the option or the value (else another check failed first: a bad base)
        names = [key.lstrip("-"), key.lstrip("-").replace("-", "_"), value.strip(), *re.split(r"[,=]", value)]
        try:
            assert_user_error(r, before=before, root=work)
            assert any(w.strip() and w.strip() in r.stderr for w in names), (path, key, value, r.stderr)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0:4])
    assert not failures, f"{len(failures)} of {len(cases)} cases broke the contract: {failures}"
