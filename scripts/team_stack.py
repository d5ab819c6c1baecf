"""The team set-up on one machine, for trying it and for tests: PostgreSQL, an S3 server and an MLflow server.

    python scripts/team_stack.py start     # (make stack-up) start all three on 127.0.0.1, wait until each answers
    python scripts/team_stack.py status    # which of them answer; exit status 1 if one does not
    python scripts/team_stack.py stop      # (make stack-down) stop them; `--purge` deletes their data too

- PostgreSQL (Debian's server, /usr/lib/postgresql/<version>/bin) holds MLflow's runs and registry: database
  `mlflow`, user `mlflow`, password authentication over TCP only. PostgreSQL refuses to run as root: run as
  root, this script runs it as the `postgres` system user (else `nobody`; `--pg-user` picks another).
- An S3-compatible server, `moto_server` (the `team` extras), with one bucket, checking every request's keys and
  signature as S3 does. moto keeps objects in memory: they are gone when the stack stops. A team runs MinIO or
  uses S3 itself; nothing else changes.
- `mlflow server --backend-store-uri postgresql://... --artifacts-destination s3://<bucket>/mlflow`: clients
  send artifacts through it, so only the server needs the S3 credentials for MLflow (DVC's remote needs them too).

Everything lives in the stack's folder (`--dir`, default `.stack/` in the project root, git-ignored): the
servers' logs, PostgreSQL's data and the file `env`, which `source .stack/env` exports: MLFLOW_TRACKING_URI,
MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY. PostgreSQL's password comes from the
environment (STACK_PG_PASSWORD) or that file, else is generated once; the S3 keys are issued by moto at each start
of the S3 server. Credentials are written only to that file (mode 600), and everything printed masks them. Ports
are free ones at the first start unless --pg-port, --s3-port, --mlflow-port (or STACK_PG_PORT, ...) say
otherwise, and the same ones after.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # moto_server and mlflow: the project's environment's
DEFAULT_DIR = ROOT / ".stack"
DB = "mlflow"  # the PostgreSQL database and user
DEFAULT_BUCKET = "dcgan"
S3_USER = "dcgan-stack"  # the IAM user moto issues the stack's S3 keys to
REGION = "us-east-1"  # any region: moto and MinIO ignore it, boto3 wants one
# MLflow migrates a new PostgreSQL database on its first start: a minute or more on a busy machine.
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 30
# The stack's settings in its env file: read back by start, stop and status, and by tests.
SETTINGS = ("STACK_PG_PORT", "STACK_S3_PORT", "STACK_MLFLOW_PORT", "STACK_BUCKET", "STACK_PG_USER", "STACK_PG_DATA",
            "STACK_PG_PASSWORD")
SECRETS = ("STACK_PG_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")


class StackError(Exception):
    """A server that did not start or stop; the message says which and where its log is."""


@dataclass(frozen=True)
class Stack:
    """The stack's folder and settings; `env()` is what a user exports."""

    folder: Path
    pg_port: int
    s3_port: int
    mlflow_port: int
    bucket: str
    pg_user: str  # the system user PostgreSQL runs as
    pg_data: Path  # its data folder, owned by pg_user
    pg_password: str
    access_key: str
    secret_key: str

    @property
    def pg_uri(self) -> str:
        """The backend store URI with its password, for the env file only."""
        return f"postgresql://{DB}:{self.pg_password}@127.0.0.1:{self.pg_port}/{DB}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def env(self) -> dict[str, str]:
        """Returns the variables that point MLflow's clients, DVC's S3 remote and boto3 at the stack."""
        return {"MLFLOW_TRACKING_URI": self.mlflow_url, "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": REGION,
                # MLflow's clients fetch artifacts straight from S3 through presigned URLs when the server offers
                # them; moto, once it checks keys, fails every presigned request (it looks for an Authorization
                # header), so with this stack artifacts come and go through the tracking server. S3 and MinIO
                # need neither line.
                "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false", "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false"}

    def settings(self) -> dict[str, str]:
        return {"STACK_PG_PORT": str(self.pg_port), "STACK_S3_PORT": str(self.s3_port),
                "STACK_MLFLOW_PORT": str(self.mlflow_port), "STACK_BUCKET": self.bucket,
                "STACK_PG_USER": self.pg_user, "STACK_PG_DATA": str(self.pg_data),
                "STACK_PG_PASSWORD": self.pg_password, "STACK_PG_URI": self.pg_uri}


def env_file(folder: Path) -> Path:
    return folder / "env"


def read_env_file(path: Path) -> dict[str, str]:
    """Returns the NAME=value lines of an env file written by `write_env_file` (`export` optional)."""
    values = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip().removeprefix("export ")
            if line and not line.startswith("#") and "=" in line:
                name, _, value = line.partition("=")
                values[name] = shlex.split(value)[0] if value else ""
    return values


def write_env_file(stack: Stack) -> Path:
    """Writes the stack's env file, readable by its owner only: the exported variables, then the stack's own."""
    path = env_file(stack.folder)
    lines = ["# The team stack (scripts/team_stack.py): `source` this file. It holds credentials: never commit it.",
             *(f"export {k}={shlex.quote(v)}" for k, v in stack.env().items()),
             "# The stack's own settings, which start, stop and status read back.",
             *(f"{k}={shlex.quote(v)}" for k, v in stack.settings().items())]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)  # an older file keeps its mode through O_TRUNC
    return path


def masked_value(name: str, value: str) -> str:
    return "***" if name in SECRETS else value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_stack(folder: Path, args: argparse.Namespace | None = None) -> Stack:
    """Returns the stack of `folder`: arguments first, then the environment, then its env file, then new values."""
    saved = read_env_file(env_file(folder))

    def setting(name: str, given=None, new=None) -> str:
        if given not in (None, 0, ""):
            return str(given)
        return os.environ.get(name) or saved.get(name) or (new() if new else "")

    pg_user = setting("STACK_PG_USER", getattr(args, "pg_user", None), default_pg_user)
    return Stack(
        folder=folder,
        pg_port=int(setting("STACK_PG_PORT", getattr(args, "pg_port", None), free_port)),
        s3_port=int(setting("STACK_S3_PORT", getattr(args, "s3_port", None), free_port)),
        mlflow_port=int(setting("STACK_MLFLOW_PORT", getattr(args, "mlflow_port", None), free_port)),
        bucket=setting("STACK_BUCKET", getattr(args, "bucket", None), lambda: DEFAULT_BUCKET),
        pg_user=pg_user,
        pg_data=Path(setting("STACK_PG_DATA", None, lambda: str(pg_data_folder(folder, pg_user)))),
        pg_password=setting("STACK_PG_PASSWORD", None, lambda: secrets.token_urlsafe(18)),
        # The S3 server issues the keys (issue_s3_keys); until it has, none. The exported names are the AWS
        # ones, but a user's own AWS keys must not become the stack's: only the env file's are read.
        access_key=saved.get("AWS_ACCESS_KEY_ID") or "none-yet",
        secret_key=saved.get("AWS_SECRET_ACCESS_KEY") or "none-yet",
    )


# --- PostgreSQL ---------------------------------------------------------------------------------------------------

def pg_bin() -> Path:
    """Returns the folder of PostgreSQL's server programs: STACK_PG_BIN, pg_ctl on PATH, or Debian's newest."""
    if os.environ.get("STACK_PG_BIN"):
        return Path(os.environ["STACK_PG_BIN"])
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent  # e.g. a link to Debian's /usr/lib/postgresql/<version>/bin
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise StackError("PostgreSQL's server is not installed (no initdb in /usr/lib/postgresql/*/bin nor pg_ctl "
                         "on PATH): `make postgres`, or as root `apt-get install postgresql`")
    return Path(found[-1]).parent


def default_pg_user() -> str:
    """Returns the user PostgreSQL runs as: this one, or as root the `postgres` system user, else `nobody`."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name).pw_name
    raise StackError("running as root, and neither a `postgres` nor a `nobody` user exists for PostgreSQL: "
                     "create one, or pass --pg-user")


def reachable(path: Path, user: str) -> bool:
    """Returns whether `user` may enter every existing folder on the way to `path` (start makes the others 711)."""
    account = pwd.getpwnam(user)
    for folder in [*reversed(path.parents)]:
        if not folder.exists():
            break
        info = folder.stat()
        if info.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif info.st_gid == account.pw_gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return False
    return True


def pg_data_folder(folder: Path, user: str) -> Path:
    """Returns where PostgreSQL keeps its data: in the stack's folder, or where `user` can reach, if it cannot."""
    inside = folder / "postgres"
    if reachable(inside, user):
        return inside
    # e.g. a test's tmp_path under /tmp/pytest-of-root (mode 700): a private folder of the system's temp dir.
    return Path(tempfile.mkdtemp(prefix="team-stack-postgres-"))


def as_pg_user(stack: Stack, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Runs `cmd` as the stack's PostgreSQL user (root drops to it), in its folder, failing with its output."""
    account = pwd.getpwnam(stack.pg_user)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(stack.pg_data),
           "PGPASSWORD": stack.pg_password}
    user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []} if os.geteuid() == 0 else {}
    result = subprocess.run(cmd, cwd=stack.pg_data, env=env, capture_output=True, text=True, check=False, **user,
                            **kwargs)
    if result.returncode != 0:
        raise StackError(f"{Path(cmd[0]).name} failed ({result.returncode}): {result.stdout}{result.stderr}".strip())
    return result


def init_postgres(stack: Stack) -> None:
    """Creates the database cluster (user `mlflow`, password authentication only) and the `mlflow` database."""
    account = pwd.getpwnam(stack.pg_user)
    stack.pg_data.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(stack.pg_data, account.pw_uid, account.pw_gid)
    if (stack.pg_data / "data" / "PG_VERSION").exists():
        return
    password_file = stack.pg_data / "password"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(stack.pg_password + "\n")
    os.chown(password_file, account.pw_uid, account.pw_gid)
    try:
        as_pg_user(stack, [str(pg_bin() / "initdb"), "-D", "data", "-U", DB, f"--pwfile={password_file}",
                           "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"])
    finally:
        password_file.unlink()
    with open(stack.pg_data / "data" / "postgresql.conf", "a") as conf:
        # TCP on 127.0.0.1 only, no Unix socket (Debian's socket folder belongs to its own clusters).
        conf.write("\n# team stack\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n")


def start_postgres(stack: Stack) -> Stack:
    init_postgres(stack)
    if not pg_running(stack):
        as_pg_user(stack, [str(pg_bin() / "pg_ctl"), "-D", "data", "-l", "postgres.log", "-w", "-t",
                           str(START_TIMEOUT_S), "-o", f"-p {stack.pg_port}", "start"], timeout=START_TIMEOUT_S + 30)
    exists = as_pg_user(stack, [str(pg_bin() / "psql"), "-h", "127.0.0.1", "-p", str(stack.pg_port), "-U", DB,
                                "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{DB}'"])
    if exists.stdout.strip() != "1":
        as_pg_user(stack, [str(pg_bin() / "createdb"), "-h", "127.0.0.1", "-p", str(stack.pg_port), "-U", DB, DB])
    return stack


def pg_running(stack: Stack) -> bool:
    if not (stack.pg_data / "data" / "PG_VERSION").exists():
        return False
    try:
        as_pg_user(stack, [str(pg_bin() / "pg_ctl"), "-D", "data", "status"])
    except StackError:
        return False
    return True


def pg_answers(stack: Stack) -> bool:
    try:
        as_pg_user(stack, [str(pg_bin() / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(stack.pg_port)])
    except (StackError, KeyError, FileNotFoundError):
        return False
    return True


def stop_postgres(stack: Stack) -> None:
    if pg_running(stack):
        as_pg_user(stack, [str(pg_bin() / "pg_ctl"), "-D", "data", "-m", "fast", "-w", "-t", str(STOP_TIMEOUT_S),
                           "stop"], timeout=STOP_TIMEOUT_S + 30)


# --- moto_server and mlflow server: background processes in their own sessions -----------------------------------

def pid_file(stack: Stack, name: str) -> Path:
    return stack.folder / f"{name}.pid"


def spawn(stack: Stack, name: str, cmd: list[str], env: dict[str, str]) -> None:
    """Starts `cmd` in its own session (so that stop ends all its processes), output to <folder>/<name>.log."""
    log = stack.folder / f"{name}.log"
    with open(log, "ab") as output:  # a file, not a pipe: nobody reads a pipe once this script exits
        process = subprocess.Popen(cmd, cwd=stack.folder, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    pid_file(stack, name).write_text(json.dumps({"pid": process.pid, "cmd": Path(cmd[0]).name}))


def running_pid(stack: Stack, name: str) -> int | None:
    """Returns the pid of the stack's `name` process if it still runs (checked by its command, not just its pid)."""
    try:
        saved = json.loads(pid_file(stack, name).read_text())
        pid = saved["pid"]
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2][:1]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError, KeyError):
        return None
    if state == "Z":  # exited, not yet reaped
        return None
    # The command line is empty for a moment while the new process execs; after that it must be the command
    # started, not another process that got a recycled pid.
    return pid if not cmdline or saved["cmd"] in cmdline else None


def stop_process(stack: Stack, name: str) -> None:
    """Ends the stack's `name` process group: SIGTERM, then SIGKILL for what is left after STOP_TIMEOUT_S."""
    pid = running_pid(stack, name)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and group_alive(pid):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    pid_file(stack, name).unlink(missing_ok=True)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # A zombie leader (our child, unreaped) counts as gone.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        return Path(f"/proc/{pgid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_for(stack: Stack, name: str, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not answers(url):
        if running_pid(stack, name) is None:
            raise StackError(f"{name} exited; its log: {stack.folder / (name + '.log')}\n{tail(stack, name)}")
        if time.monotonic() > deadline:
            raise StackError(f"{name} did not answer {url} within {START_TIMEOUT_S} s; its log: "
                             f"{stack.folder / (name + '.log')}")
        time.sleep(0.5)


def tail(stack: Stack, name: str, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join((stack.folder / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
    return ""


def s3_client(stack: Stack, service: str = "s3", access_key: str | None = None, secret_key: str | None = None):
    import boto3  # the team extras

    return boto3.client(service, endpoint_url=stack.s3_url, region_name=REGION,
                        aws_access_key_id=access_key or stack.access_key,
                        aws_secret_access_key=secret_key or stack.secret_key)


def issue_s3_keys(stack: Stack) -> Stack:
    """Returns the stack with keys that a new moto_server issued, its bucket made, and authentication on.

    moto checks no signature until told to: then, like S3 and MinIO, it refuses unknown keys and wrong secrets
    (InvalidAccessKeyId, SignatureDoesNotMatch), so the stack shows what wrong credentials do. moto issues the
    keys itself (an IAM user allowed s3:*); they change at each start of the S3 server, and the env file follows.
    """
    iam = s3_client(stack, "iam", "setup", "setup")  # any keys: nothing is checked yet
    iam.create_user(UserName=S3_USER)
    iam.put_user_policy(UserName=S3_USER, PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=S3_USER)["AccessKey"]
    stack = replace(stack, access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"])
    write_env_file(stack)
    s3_client(stack).create_bucket(Bucket=stack.bucket)
    # From now on every request is authenticated: 0 unauthenticated actions left.
    # (text/plain: as a form, which urllib's default type says it is, the body would not reach moto.)
    request = urllib.request.Request(f"{stack.s3_url}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10):
        pass
    return stack


def start_s3(stack: Stack) -> Stack:
    """Returns the stack once its S3 server answers, with working keys and its bucket."""
    new = running_pid(stack, "s3") is None
    if new:
        spawn(stack, "s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(stack.s3_port)],
              {"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    wait_for(stack, "s3", s3_health_url(stack))
    # A running one keeps the keys it issued, which the env file holds.
    return issue_s3_keys(stack) if new else stack


def s3_health_url(stack: Stack) -> str:
    """Returns a URL that moto answers without credentials (its dashboard), also once authentication is on."""
    return f"{stack.s3_url}/moto-api/"


def server_env(stack: Stack) -> dict[str, str]:
    """Returns the mlflow server's environment: S3's endpoint and keys, PostgreSQL's password (not in its argv)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "PG"))}
    env.update(stack.env(), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PGPASSWORD=stack.pg_password,
               # No GenAI job runner (worker processes this pipeline never uses), no usage reports.
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI")
    return env


def mlflow_command(stack: Stack, port: int, artifacts: str) -> list[str]:
    """Returns the `mlflow server` command: the password comes from PGPASSWORD, so `ps` does not show it."""
    return [str(BIN / "mlflow"), "server", "--backend-store-uri", f"postgresql://{DB}@127.0.0.1:{stack.pg_port}/{DB}",
            "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


def start_mlflow(stack: Stack) -> Stack:
    if running_pid(stack, "mlflow") is None:
        spawn(stack, "mlflow", mlflow_command(stack, stack.mlflow_port, f"s3://{stack.bucket}/mlflow"),
              server_env(stack))
    wait_for(stack, "mlflow", f"{stack.mlflow_url}/health")
    return stack


# --- commands -----------------------------------------------------------------------------------------------------

def start(stack: Stack) -> None:
    stack.folder.mkdir(parents=True, exist_ok=True)
    # Enterable but not listable by others: PostgreSQL's user reaches its data folder, nobody reads the env file.
    os.chmod(stack.folder, 0o711)
    write_env_file(stack)
    steps = (("postgres", start_postgres), ("s3", start_s3), ("mlflow", start_mlflow))
    for name, step in steps:
        print(f"starting {name} ...", flush=True)
        stack = step(stack)
    show(stack)
    print(f"\nThe variables (credentials masked here) are in {env_file(stack.folder)}: "
          f"`source {display(env_file(stack.folder))}`")
    for name, value in stack.env().items():
        print(f"  export {name}={masked_value(name, value)}")
    print(f"DVC's S3 remote: dvc remote add -d s3 s3://{stack.bucket}/dvc && "
          f"dvc remote modify s3 endpointurl {stack.s3_url}")


def stop(stack: Stack, purge: bool) -> None:
    errors = []
    for name, step in (("mlflow", lambda: stop_process(stack, "mlflow")), ("s3", lambda: stop_process(stack, "s3")),
                       ("postgres", lambda: stop_postgres(stack))):
        try:
            step()
            print(f"stopped {name}")
        except (StackError, OSError, KeyError) as e:
            errors.append(f"{name}: {e}")
    if errors:
        raise StackError("; ".join(errors))
    if purge:
        shutil.rmtree(stack.pg_data, ignore_errors=True)
        for name in ("env", "s3.log", "mlflow.log"):
            (stack.folder / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            stack.folder.rmdir()
        print(f"deleted the stack's data ({stack.pg_data}, {stack.folder})")
    else:
        print("moto kept the S3 objects in memory: they are gone (PostgreSQL's data stays)")


def show(stack: Stack) -> bool:
    """Prints each server and whether it answers; returns whether all do."""
    states = {
        "postgres": (pg_answers(stack), (f"postgresql://{DB}:***@127.0.0.1:{stack.pg_port}/{DB}  (data: "
                                         f"{stack.pg_data}, user {stack.pg_user})")),
        "s3": (answers(s3_health_url(stack)), f"{stack.s3_url}  (moto_server, bucket s3://{stack.bucket})"),
        "mlflow": (answers(f"{stack.mlflow_url}/health"),
                   f"{stack.mlflow_url}  (artifacts: s3://{stack.bucket}/mlflow)"),
    }
    for name, (up, where) in states.items():
        print(f"{name:9} {'up  ' if up else 'DOWN'} {where}")
    return all(up for up, _ in states.values())


def display(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("STACK_DIR", DEFAULT_DIR)),
                        help="the stack's folder (default: .stack/ in the project root)")
    parser.add_argument("--pg-port", type=int, help="PostgreSQL's port (default: a free one at the first start)")
    parser.add_argument("--s3-port", type=int, help="the S3 server's port")
    parser.add_argument("--mlflow-port", type=int, help="the MLflow server's port")
    parser.add_argument("--bucket", help=f"the S3 bucket (default: {DEFAULT_BUCKET})")
    parser.add_argument("--pg-user", help="the system user PostgreSQL runs as, when run as root")
    parser.add_argument("--purge", action="store_true", help="stop: delete the stack's data and env file too")
    args = parser.parse_args(argv)
    folder = args.dir.resolve()
    try:
        if args.command != "start" and not env_file(folder).is_file():
            print(f"no stack in {folder} (no env file): `start` makes one")
            return 0 if args.command == "stop" else 1
        stack = load_stack(folder, args if args.command == "start" else None)
        if args.command == "start":
            try:
                start(stack)
            except BaseException:
                print("start failed: stopping what it started", file=sys.stderr)
                with contextlib.suppress(StackError):
                    stop(stack, purge=False)
                raise
        elif args.command == "stop":
            stop(stack, args.purge)
        else:
            return 0 if show(stack) else 1
    except StackError as e:
        print(f"team stack: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
