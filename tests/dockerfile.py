"""Replay a Dockerfile's build steps without a Docker engine.

Machines here have no Docker engine, so tests check a Dockerfile by doing what its build
would do, step by step, in a temporary folder that stands for each stage's filesystem:
every COPY copies from the build context (honouring ``<Dockerfile>.dockerignore``) or
from an earlier stage, every ENV and ARG goes into the environment, and every RUN runs
with ``/bin/sh -c`` as the image would run it, with the image's absolute paths moved
under the stage's folder. ``python`` is a clean virtualenv of the interpreter running
the tests, which must be the image's Python (``ARG PYTHON``).

Debian packages are the one thing it does not install: a RUN of the form ``apt-get
update && apt-get install ... PKG... && rm -rf /var/lib/apt/lists/*`` is checked instead,
each PKG having to be installed on this machine (the Makefile's APT_PACKAGES), since
this machine's Debian stands for the image's.

What it cannot do it refuses loudly rather than skip: a RUN after USER (it runs as the
caller), an absolute path in a RUN or ENV outside the mapped prefixes, an instruction it
does not know.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# Image paths the replay moves under a stage's folder (anything else absolute is refused).
MAPPED = ("/src", "/dist", "/opt", "/etc/casemask", "/var/lib/casemask")
KNOWN = {"ARG", "FROM", "ENV", "WORKDIR", "COPY", "RUN", "USER", "VOLUME", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD", "LABEL"}


class ReplayError(AssertionError):
    pass


@dataclasses.dataclass
class Stage:
    name: str
    base: str
    root: Path
    env: dict[str, str]
    cwd: str = "/"
    user: str = "root"


@dataclasses.dataclass
class Replay:
    stages: list[Stage]
    runs: list[tuple[str, int]]  # (command as written, exit status)
    volumes: list[str]
    healthcheck: str
    entrypoint: str

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def path(self, image_path: str) -> Path:
        """Where ``image_path`` of the final stage lies on this machine."""
        return _host(self.final, image_path)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in dockerfile.read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), ""), text)


def _map_paths(text: str, stage: Stage, where: str) -> str:
    """Move the image's absolute paths in ``text`` under the stage's folder."""

    def sub(m: re.Match) -> str:
        p = m.group(0)
        if not any(p == pre or p.startswith(pre + "/") for pre in MAPPED):
            raise ReplayError(f"{where}: the replay maps only {MAPPED}; {p!r} is not among them (add it to tests/dockerfile.py MAPPED)")
        return str(stage.root) + p

    return re.sub(r"(?<![\w.:/$-])/[A-Za-z][\w./*-]*", sub, text)


def _host(stage: Stage, image_path: str) -> Path:
    p = image_path if image_path.startswith("/") else f"{stage.cwd.rstrip('/')}/{image_path}"
    return Path(str(stage.root) + os.path.normpath(p))


def _ignored(rel: str, patterns: list[str]) -> bool:
    for pat in patterns:
        if fnmatch.fnmatch(rel, pat) or (pat.startswith("**/") and fnmatch.fnmatch(Path(rel).name, pat[3:])):
            return True
        if any(fnmatch.fnmatch("/".join(Path(rel).parts[: k + 1]), pat) for k in range(len(Path(rel).parts) - 1)):
            return True
    return False


def _copy(srcs: list[Path], dest: Path, dest_is_dir: bool, context: Path | None, ignore: list[str]) -> None:
    for src in srcs:
        if src.is_dir():
            for f in sorted(src.rglob("*")):
                rel_ctx = str(f.relative_to(context)) if context else ""
                if f.is_dir() or (context and _ignored(rel_ctx, ignore)):
                    continue
                target = dest / f.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
        else:
            target = dest / src.name if dest_is_dir else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


_APT_HOUSEKEEPING = re.compile(r"^(apt-get update( -\S+)*|rm -rf /var/lib/apt/lists/\*)$")


def _apt_packages(cmd: str) -> list[str] | None:
    """The packages of an apt-get-only RUN, or None when the RUN does something else."""
    parts = [p.strip() for p in cmd.split("&&")]
    installs = [p for p in parts if p.startswith("apt-get install")]
    if not installs or not all(p in installs or _APT_HOUSEKEEPING.match(p) for p in parts):
        return None
    return [w for p in installs for w in p.split()[2:] if not w.startswith("-")]


def replay(dockerfile: Path, context: Path, work: Path, build_args: dict[str, str | None] | None = None, timeout_s: float = 900) -> Replay:
    """Replay ``dockerfile`` with ``context`` as build context, stages under ``work``.

    ``build_args`` override ARG defaults as ``docker build --build-arg`` would (None:
    leave the variable unset). Raises ReplayError at the first step that fails.
    """
    build_args = build_args or {}
    ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
    ignore = [ln.strip() for ln in ignore_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")] if ignore_file.exists() else []
    python = work / "python"  # the image's interpreter: a clean virtualenv of this one
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(python)], check=True, timeout=120)
    base_env = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k in ("LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE")}
    base_env["PATH"] = f"{python / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    runs: list[tuple[str, int]] = []
    volumes: list[str] = []
    health = entry = ""
    for word, rest in instructions(dockerfile):
        if word not in KNOWN:
            raise ReplayError(f"{word}: an instruction the replay does not know")
        stage = stages[-1] if stages else None
        where = f"{dockerfile.name} {word} {rest[:60]}"
        if word == "ARG":
            name, _, default = rest.partition("=")
            value = build_args[name] if name in build_args else default.strip('"')
            if stage is None:
                global_args[name] = value or ""
            elif value is not None:
                stage.env[name] = _expand(value, stage.env)
            continue
        if stage is None and word != "FROM":
            raise ReplayError(f"{where}: before FROM")
        if word == "FROM":
            parts = rest.split()
            base = _expand(parts[0], global_args)
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(stages))
            root = work / f"stage-{len(stages)}"
            root.mkdir()
            stages.append(Stage(name, base, root, dict(base_env)))
        elif word == "ENV":
            for tok in shlex.split(rest):
                key, _, value = tok.partition("=")
                value = _expand(value, stage.env)
                if key == "PATH":  # map the image's folders, keep the replay's own
                    value = ":".join(_map_paths(p, stage, where) if any(p.startswith(m + "/") for m in MAPPED) else p for p in value.split(":"))
                else:
                    value = _map_paths(value, stage, where)
                stage.env[key] = value
        elif word == "WORKDIR":
            stage.cwd = rest
            _host(stage, rest).mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            toks = shlex.split(rest)
            flags = [t for t in toks if t.startswith("--")]
            args = [t for t in toks if not t.startswith("--")]
            src_stage = next((s for s in stages if any(f == f"--from={s.name}" for f in flags)), None)
            dest_raw = args[-1]
            dest = _host(stage, dest_raw)
            srcs: list[Path] = []
            for a in args[:-1]:
                found = sorted(_host(src_stage, a).parent.glob(Path(a).name)) if src_stage else sorted(context.glob(a))
                if not found:
                    raise ReplayError(f"{where}: {a} matches nothing")
                srcs += found
            _copy(srcs, dest, dest_raw.endswith("/") or len(srcs) > 1, None if src_stage else context, ignore)
        elif word == "RUN":
            if stage.user not in ("root", "0"):
                raise ReplayError(f"{where}: RUN after USER {stage.user} cannot be replayed as that user")
            packages = _apt_packages(rest)
            if packages is not None:
                missing = [p for p in packages if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
                if missing:
                    raise ReplayError(f"{where}: Debian packages {missing} are not installed here (add them to the Makefile's APT_PACKAGES)")
                runs.append((rest, 0))
                continue
            cmd = _map_paths(rest, stage, where)
            proc = subprocess.run(["/bin/sh", "-c", cmd], cwd=_host(stage, stage.cwd), env=stage.env, capture_output=True, text=True, timeout=timeout_s)
            runs.append((rest, proc.returncode))
            if proc.returncode != 0:
                raise ReplayError(f"{where}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}")
        elif word == "USER":
            stage.user = rest
        elif word == "VOLUME":
            volumes += [v.strip('"') for v in re.findall(r'"[^"]+"|\S+', rest.strip("[]").replace(",", " "))]
        elif word == "HEALTHCHECK":
            health = rest
        elif word in ("ENTRYPOINT", "CMD"):
            entry = (entry + " " + rest).strip()
    return Replay(stages, runs, volumes, health, entry)
