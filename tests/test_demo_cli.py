"""What a new user sees on the terminal: the demo command and its --checkpoint mode run as
subprocesses, the way README's first command runs them."""
from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from demo import cli  # noqa: E402

PYTHON = sys.executable


def demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "demo.run_dno", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def help_of(text: str, flag: str) -> str:
    """The help paragraph of ``flag`` in ``--help`` output, on one line."""
    m = re.search(rf"^  {re.escape(flag)}\b(.*?)(?=^  -|^\S|\Z)", text, re.S | re.M)
    assert m, f"{flag} is not in --help"
    return " ".join(m.group(1).split())


# --------------------------------------------------------------------------- one flag, one meaning

def test_help_shows_both_modes_and_one_meaning_per_flag():
    done = demo("--help", timeout=60)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for flag in ("--checkpoint", "--workflow", "--comfyui", "--width", "--height", "--prompt", "--negative",
                 "--image", "--controlnet", "--device", "--timeout", "--opt-steps", "--steps", "--lr", "--seed",
                 "--precision", "--reward", "--threads", "--out", "--gamma", "--samples", "--model", "--guidance"):
        help_of(text, flag)
    assert "DNO optimisation steps" in help_of(text, "--opt-steps")
    steps = help_of(text, "--steps")
    assert "sampling steps" in steps and "DNO" not in steps
    assert "default 8" in help_of(text, "--samples") and "4 samples" not in text
    assert "default auto: fp32 on a CPU" in help_of(text, "--precision")
    assert "--sampling-steps" not in text
    # demo.comfy_run is the same parser
    other = subprocess.run([PYTHON, "-m", "demo.comfy_run", "--help"], cwd=REPO, capture_output=True, text=True,
                           timeout=60)
    assert other.returncode == 0 and help_of(other.stdout, "--steps") == steps


@pytest.mark.parametrize("args,words", [
    (["--opt-steps", "0"], ["--opt-steps must be at least 1", "nothing to optimise or plot"]),
    (["--steps", "0"], ["--steps must be at least 1"]),
    (["--width", "256"], ["--width", "needs --checkpoint"]),
    (["--checkpoint", "model.safetensors", "--gamma", "0"], ["--gamma", "our own models only"]),
    (["--sampling-steps", "4"], ["--sampling-steps is now --steps", "--opt-steps"]),
    (["--reward", "hpsv2"], ["--reward 'hpsv2'", "preference", "brightness"]),
    (["--model", "shapes", "--reward", "preference"], ["--reward 'preference'", "shapes model's rewards"]),
    (["--prompt", "a purple star"], ["--prompt 'a purple star'", "a red circle", "a blue cross"]),
    (["--model", "shapes", "--prompt", "a red circle"], ["--prompt applies to the objects model", "unconditional"]),
    (["--checkpoint", "model.safetensors", "--guidance", "2"], ["--guidance", "our own models only"]),
])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, args, words):
    plot = tmp_path / "reward_curve.png"
    plot.write_bytes(b"an earlier run's plot")
    done = demo(*args, "--out", str(tmp_path), timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert all(w in done.stderr for w in words), done.stderr
    assert plot.read_bytes() == b"an earlier run's plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward_curve.png"]


def test_demo_says_what_it_runs_and_writes_the_plots(tmp_path):
    """The default: the objects model, its default prompt and the learned reward."""
    done = demo("--opt-steps", "2", "--steps", "4", "--samples", "2", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "the objects model, prompt 'a red circle', guidance 3" in out, out
    assert "reward preference, 2 DNO steps x 4 ODE (x_T optimised) sampling steps, 2 samples" in out, out
    assert "precision auto -> fp32 (CPU)" in out
    # --steps is sampling steps here too: 3 renders (the start and 2 updates) x 4 steps
    assert "(12 denoiser evals/image" in out, out
    assert "DNO preference" in done.stderr and "3/3" in done.stderr  # the progress bar
    assert (tmp_path / "before_after.png").stat().st_size > 1000
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000


def test_shapes_model_demo_runs_its_pixel_reward(tmp_path):
    done = demo("--model", "shapes", "--opt-steps", "2", "--steps", "4", "--samples", "2", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "DNO on the shapes model: reward brightness, 2 DNO steps x 4 ancestral sampling steps, 2 samples" \
        in done.stdout, done.stdout
    assert "DNO brightness" in done.stderr and "3/3" in done.stderr
    assert (tmp_path / "before_after.png").stat().st_size > 1000


# --------------------------------------------------------------------------- --help states what a run uses

class _Captured(Exception):
    """Raised by the stand-in for the run: the settings it was called with."""

    def __init__(self, reward, seeds, settings):
        super().__init__("captured")
        self.reward, self.seeds, self.settings = reward, seeds, settings


def stated_default(text: str, flag: str, model: str, reward: str) -> str:
    """The default ``--help`` states for ``flag`` on ``model`` and ``reward``, e.g. from
    "(default objects model: 0.03 for preference, 0.01 for the others; shapes model: ...; with
    --checkpoint ...)" or "(default 12 for jpeg_incompressibility, 20 for the others, both models;"."""
    m = re.search(r"\(default (.*?)(?:; with --checkpoint|\)$|, the scale)", help_of(text, flag))
    assert m, f"{flag}: no default in {help_of(text, flag)!r}"
    stated = m.group(1)
    if "objects model:" in stated:
        parts = dict(re.findall(r"(objects|shapes) model: (.*?)(?=; (?:objects|shapes) model:|$)", stated))
        assert set(parts) == {"objects", "shapes"}, stated
        stated = parts[model]
    stated = stated.removesuffix(", both models")
    groups, value = {}, None
    for token in stated.split(", "):
        m = re.fullmatch(r"(\S+) for (.+)", token)
        if m:
            value, token = m.groups()
        elif value is None:          # one value for every reward
            return token
        groups[token] = value
    return groups.get(reward, groups["the others"])


@pytest.fixture(scope="module")
def help_text():
    done = demo("--help", timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("model,reward", [("objects", r) for r in cli.OBJECTS_REWARDS]
                         + [("shapes", r) for r in cli.SHAPES_REWARDS] + [("objects", None), ("shapes", None)])
def test_help_states_the_defaults_the_run_uses(help_text, monkeypatch, tmp_path, model, reward):
    """Issue 25: --help once said lr 0.01 and guidance 4 while the run used 0.03 and 3. Here the
    run itself (demo.run_dno.main, stopped where it hands its settings to DNO) is compared with
    what --help states for that model and reward."""
    import demo.alignment
    import demo.run_dno

    def objects_run(models, reward_name, label, seeds, **kw):
        raise _Captured(reward_name, seeds, kw)

    def shapes_run(denoiser, classifier, reward_fn, seeds, **kw):
        raise _Captured(reward_fn.name if hasattr(reward_fn, "name") else reward_fn, seeds, kw)

    monkeypatch.setattr(demo.alignment, "dno_on_prompt", objects_run)
    monkeypatch.setattr(demo.run_dno, "dno_run", shapes_run)
    argv = ["--model", model, "--out", str(tmp_path)] + (["--reward", reward] if reward else [])
    with pytest.raises(_Captured) as run:
        demo.run_dno.main(argv)
    used = run.value.settings
    if reward is None:
        # the default reward --help names for this model
        default = re.search(r"\(default (\w+)", help_of(help_text, "--reward")).group(1) if model == "objects" \
            else re.search(r"defaults to (\w+)", help_of(help_text, "--reward")).group(1)
        assert run.value.reward == default
        reward = default
    if model == "objects":
        assert run.value.reward == reward
    for flag, key in (("--lr", "lr"), ("--gamma", "gamma"), ("--opt-steps", "steps")):
        assert float(stated_default(help_text, flag, model, reward)) == used[key], (flag, used)
    assert int(stated_default(help_text, "--steps", model, reward)) == used["sampling_steps"]
    assert int(stated_default(help_text, "--samples", model, reward)) == len(run.value.seeds)
    if model == "objects":
        assert float(stated_default(help_text, "--guidance", model, reward)) == used["guidance"]
    assert (tmp_path / "before_after.png").exists() is False


# --------------------------------------------------------------------------- what the run's numbers mean

def _summary(realism_before, realism_after, p_before=0.9, p_after=1.0, reward=(0.7, 0.9)):
    import torch

    from demo.experiment import RunSummary

    n = len(realism_before)
    t = torch.tensor
    return RunSummary(reward_before=t([reward[0]] * n), reward_after=t([reward[1]] * n),
                      realism_before=t(realism_before), realism_after=t(realism_after),
                      denoise_err_before=t([0.003] * n), denoise_err_after=t([0.003] * n),
                      images_before=torch.zeros(n, 3, 4, 4), images_after=torch.zeros(n, 3, 4, 4), reward_curve=[],
                      denoiser_evaluations_per_image=10.0, seconds=1.0,
                      probability_before=t([p_before] * n), probability_after=t([p_after] * n))


def test_verdict_says_plainly_when_realism_fell_and_why():
    from demo.run_dno import verdict

    fell = " ".join(verdict(_summary([0.9, 0.5], [0.8, 0.3]), gamma=10.0, reward="preference"))
    assert "The reward rose: 0.700 -> 0.900" in fell
    assert "Realism FELL: 0.700 -> 0.550 (2 of 2 images lower)" in fell
    assert "kept the optimised noise as typical as the start's (noise probability P 0.90 -> 1.00" in fell
    assert "bounds the noise, not the image" in fell and "--gamma 0" in fell
    held = " ".join(verdict(_summary([0.9, 0.5], [0.9, 0.49]), gamma=10.0))
    assert "Realism held: 0.700 -> 0.695" in held and "FELL" not in held
    off = " ".join(verdict(_summary([0.9, 0.5], [0.1, 0.2], p_after=0.4), gamma=0.0))
    assert "Realism FELL" in off and "regulariser is off (--gamma 0)" in off and "P 0.90 -> 0.40" in off
    weak = " ".join(verdict(_summary([0.9, 0.5], [0.1, 0.2], p_after=0.4), gamma=10.0))
    assert "the noise left the typical set" in weak and "Raise --gamma" in weak
    flat = " ".join(verdict(_summary([0.9], [0.9], reward=(0.7, 0.7)), gamma=10.0))
    assert "The reward did not rise" in flat


def test_demo_prints_realism_before_and_after_and_what_it_means(tmp_path):
    done = demo("--opt-steps", "2", "--samples", "2", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "warning" not in out, out           # the default 10 sampling steps are what the model knows
    m = re.search(r"realism (\d\.\d+) -> (\d\.\d+)   noise P (\d\.\d+) -> (\d\.\d+)", out)
    assert m, out
    before, after = float(m.group(1)), float(m.group(2))
    if after >= before - 0.02:
        assert f"Realism held: {before:.3f} -> {after:.3f}" in out, out
    else:
        assert f"Realism FELL: {before:.3f} -> {after:.3f}" in out and "Why:" in out, out


def test_too_few_sampling_steps_warn_before_and_after_the_run(tmp_path):
    """Issue 25: --steps 1 ended with realism 0.000 and no word about it."""
    done = demo("--steps", "1", "--opt-steps", "1", "--samples", "2", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    warning = "warning: --steps 1 is below the 10 sampling steps our models were trained and evaluated at"
    assert warning in out and out.index(warning) < out.index("DNO on the objects model"), out
    assert "outside what the model was trained for (warning above)" in out
    assert "Realism held" not in out and "Realism FELL" not in out, out


def test_guidance_outside_the_evaluated_range_warns():
    from demo.run_dno import setting_warnings

    assert setting_warnings(10, 3.0) == [] and setting_warnings(10, None) == [] and setting_warnings(20, 1.0) == []
    assert "--guidance 8 is outside the scales the objects model was evaluated at (1 to 4" in setting_warnings(10, 8.0)[0]
    assert "--steps 9 is below the 10 sampling steps" in setting_warnings(9)[0]


# --------------------------------------------------------------------------- the demo's own requirements

def requirement_closure(names: list[str]) -> set[str]:
    """Distributions that installing ``names`` brings in (from the installed metadata)."""
    def norm(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    seen, todo = set(), [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    return seen


def test_the_demo_imports_only_what_requirements_demo_installs(tmp_path):
    """README's first command installs requirements-demo.txt only: every distribution the demo
    imports (both reward kinds: autograd and the hybrid estimator) must come with it."""
    script = (
        "import importlib.metadata as md, json, sys\n"
        "from demo.run_dno import main\n"
        f"main(['--opt-steps', '1', '--steps', '2', '--samples', '1', '--out', {str(tmp_path)!r}])\n"
        f"main(['--opt-steps', '1', '--steps', '2', '--samples', '1', '--reward', 'jpeg_incompressibility', "
        f"'--out', {str(tmp_path)!r}])\n"
        "tops = {m.split('.')[0] for m in sys.modules}\n"
        "dists = md.packages_distributions()\n"
        "print(json.dumps(sorted({d for t in tops for d in dists.get(t, [])})))\n")
    done = subprocess.run([PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imported = {re.sub(r"[-_.]+", "-", d).lower() for d in json.loads(done.stdout.strip().splitlines()[-1])}
    listed = [Requirement(line).name for line in (REPO / "requirements-demo.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert "open-clip-torch" not in {n.lower() for n in listed} and "pytest" not in listed
    missing = imported - requirement_closure(listed) - {"pip", "setuptools", "wheel"}
    assert not missing, f"the demo imports {sorted(missing)}, which requirements-demo.txt does not install"


def test_test_tools_are_pinned_to_versions_the_suite_ran_on():
    specs = [Requirement(line) for line in (REPO / "requirements-test.txt").read_text().splitlines()
             if line.strip() and not line.startswith(("#", "-r"))]
    pytest_req = next(r for r in specs if r.name == "pytest")
    assert any(s.operator in ("<", "<=", "==", "~=") for s in pytest_req.specifier), \
        f"{pytest_req}: pin an upper bound, a new pytest changed monkeypatch's undo once"
    assert pytest_req.specifier.contains(Version(pytest.__version__)), \
        f"this run's pytest {pytest.__version__} is outside {pytest_req}"


def test_log_stream_passes_what_a_user_needs_and_throttles_progress_bars():
    from demo.comfy_run import LogStream

    now, shown = [0.0], []
    stream = LogStream(shown.append, every=5.0, clock=lambda: now[0])
    stream.feed("got prompt\nsome host noise\nRequested to load BaseModel\n")
    for i in range(11):                     # tqdm redraws with \r, one second apart
        now[0] = float(i)
        stream.feed(f"\r{i * 10}%|####| {i}/10 [00:{i:02d}<00:10,  1.00it/s]")
    stream.feed("\r100%|####| 10/10 [00:10<00:00,  1.00it/s]\n")   # tqdm's closing repeat
    stream.feed("DNO step 0/2  reward 0.1  best 0.1\nDNO: step 1/2 in progress, model call at sampling ")
    assert shown[-1].startswith("DNO step 0/2")          # half a line waits for its end
    stream.feed("step 3/10, 20 s into this step\nPrompt executed in 12.0 seconds\n")
    assert shown == [
        "ComfyUI: got prompt", "ComfyUI: Requested to load BaseModel",
        "sampling 0%|####| 0/10 [00:00<00:10,  1.00it/s]",
        "sampling 50%|####| 5/10 [00:05<00:10,  1.00it/s]",
        "sampling 100%|####| 10/10 [00:10<00:10,  1.00it/s]",
        "DNO step 0/2  reward 0.1  best 0.1",
        "DNO: step 1/2 in progress, model call at sampling step 3/10, 20 s into this step",
        "ComfyUI: Prompt executed in 12.0 seconds"], shown


def test_checkpoint_mode_without_the_host_packages_says_what_to_install(tmp_path):
    """With only requirements-demo.txt installed, --checkpoint names the missing packages and the
    install command instead of failing inside the server (a package is hidden from the check)."""
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"not read: the check comes first")
    script = ("import sys, demo.comfy_run as c\n"
              "c.HOST_MODULES = c.HOST_MODULES + ('no_such_host_module',)\n"
              "from demo.run_dno import entry\n"
              f"sys.exit(entry(['--checkpoint', {str(ckpt)!r}, '--out', {str(tmp_path / 'out')!r}]))\n")
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    done = subprocess.run([PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "no_such_host_module" in done.stderr and "pip install -r requirements-test.txt" in done.stderr
    assert "requirements-demo.txt" in done.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- --checkpoint mode

class Terminal:
    """A command's stdout and stderr, line by line with their arrival times, as a user sees them."""

    def __init__(self, args: list[str]):
        self.started = time.monotonic()
        self.proc = subprocess.Popen([PYTHON, "-m", "demo.run_dno", *args], cwd=REPO, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.lines: list[tuple[float, str, str]] = []
        self._queue: queue.Queue = queue.Queue()
        self._ended = 0
        for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()

    def _read(self, name, stream):
        for line in stream:
            self._queue.put((time.monotonic() - self.started, name, line.rstrip("\n")))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> tuple[float, str]:
        """Read until a line matches ``pattern``; its (seconds since the start, text)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                self._ended += 1
                if self._ended == 2:
                    raise AssertionError(f"the command exited ({self.proc.wait()}) before a line matched "
                                         f"{pattern!r}:\n" + self.text())
                continue
            self.lines.append(item)
            if re.search(pattern, item[2]):
                return item[0], item[2]
        raise AssertionError(f"no line matching {pattern!r} within {timeout:.0f}s:\n" + self.text())

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.2)
        while not self._queue.empty():
            item = self._queue.get()
            if item is not None:
                self.lines.append(item)
        return code

    def text(self, stream: str = None) -> str:
        return "\n".join(line for _, name, line in self.lines if stream in (None, name))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tiny_checkpoints import sd15_checkpoint
    return sd15_checkpoint(tmp_path_factory.mktemp("ckpt"), vae="taesd", filename="tiny-sd15.safetensors")


def hint_args() -> list[str]:
    """The flags the CPU hint prints (demo/cli.py CPU_HINT), as a user would copy them."""
    return [part for k, v in cli.CPU_HINT.items() for part in (f"--{k.replace('_', '-')}", str(v))]


@pytest.mark.server
def test_checkpoint_mode_streams_loading_sampling_and_dno_steps(checkpoint, tmp_path):
    term = Terminal(["--checkpoint", str(checkpoint), *hint_args(), "--out", str(tmp_path / "out")])
    try:
        settings_line = term.wait_for(r"^workflow ", 60)[1]
        assert "256x256, 10 sampling steps x 5 DNO steps" in settings_line
        assert "precision=auto (fp32 on the CPU)" in settings_line, settings_line
        term.wait_for(r"queueing the workflow", 120)
        term.wait_for(r"^ComfyUI: got prompt", 30)
        first_step, _ = term.wait_for(r"^DNO step 0/5\s+reward", 120)
        term.wait_for(r"^DNO step 5/5\s+reward", 300)
        assert term.finish(timeout=300) == 0, term.text()
    finally:
        term.kill()
    out = term.text("out")
    print(out)
    print(f"first DNO step line {first_step:.1f}s after the command started")
    # the acceptance bound, with room for a loaded 2-core CI machine
    assert first_step < 60, f"first DNO step line only after {first_step:.0f}s"
    assert "DNO: precision auto -> fp32 (cpu" in out
    assert "ComfyUI: Requested to load BaseModel" in out
    bars = [line for line in out.splitlines() if line.startswith("sampling ")]
    assert any("10/10" in line for line in bars), out      # the plain KSampler's progress bar
    assert len(bars) < 10                                  # throttled, not every tqdm refresh
    assert "note: no GPU in use" not in out                # the hint's own settings get no hint
    assert out.index("DNO step 5/5") < out.index("done in")
    assert (tmp_path / "out" / "rewards.json").is_file()


def port_open(url: str) -> bool:
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.server
def test_sigterm_stops_the_server_it_started(checkpoint, tmp_path):
    # the workflow's own defaults: on a CPU the client prints the hint, and the run takes long
    term = Terminal(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")])
    try:
        hint = term.wait_for(r"^note: no GPU in use", 60)[1]
        assert " ".join(hint_args()) in hint
        up = term.wait_for(r"server up on http://\S+ \(pid \d+", 120)[1]
        url, pid = re.search(r"(http://[\d.:]+) \(pid (\d+)", up).groups()
        pid = int(pid)
        term.wait_for(r"^ComfyUI: got prompt", 30)
        assert alive(pid) and port_open(url)
        term.proc.send_signal(signal.SIGTERM)
        code = term.finish(timeout=60)
    finally:
        term.kill()
    assert code == 128 + signal.SIGTERM, term.text()
    assert "SIGTERM: the server was stopped" in term.text("err")
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(pid), f"the ComfyUI server (pid {pid}) outlived its client"
    assert not port_open(url)
    assert (tmp_path / "out" / "server.log").is_file()
