"""Airflow in distributed mode on one machine, for tests: CeleryExecutor, Redis broker, PostgreSQL metadata DB.

Everything listens on 127.0.0.1 on free ports and lives in temp dirs: a private PostgreSQL cluster (``initdb`` +
``pg_ctl``, run as the ``postgres`` user when we are root), ``redis-server`` without persistence, the api-server,
scheduler and dag-processor, and two ``airflow celery worker`` processes (queue ``default`` and queue ``gpu``,
concurrency 1) that record distinct hostnames in the task instances, as two machines would.
The Debian packages are installed on first use (idempotent; a no-op once present).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.airflow_services import AirflowServices, airflow_services
from tests.stand_ins.sshd import free_port

DEBIAN_PACKAGES = ("postgresql", "redis-server")
WORKERS = {"default": "worker-default", "gpu": "worker-gpu"}
HOSTNAME_MODULE = '''"""Written by tests/e2e/celery_services.py: [core] hostname_callable of the Celery workers."""
import os
import socket


def hostname():
    """This worker's name, as a second machine would have its own (other components: the real one)."""
    return os.environ.get("LORA_DEPLOY_WORKER_HOSTNAME") or socket.getfqdn()
'''


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL server binaries (Debian layout), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


def ensure_debian_packages() -> float:
    """Install PostgreSQL and Redis with apt-get if missing; returns the seconds spent (0.0 when present)."""
    if postgres_bin() and shutil.which("redis-server"):
        return 0.0
    started = time.monotonic()
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *DEBIAN_PACKAGES],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


@dataclass
class Postgres:
    """A private PostgreSQL cluster in a temp dir, trust auth on 127.0.0.1 (superuser ``airflow``)."""

    data: Path
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``airflow`` database."""
        return f"postgresql+psycopg2://airflow@127.0.0.1:{self.port}/airflow"

    def _as_owner(self, *command: str) -> list[str]:
        """Run as ``postgres`` when we are root (the server refuses to run as root)."""
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)

    def start(self) -> None:
        """initdb, start on a free loopback port without fsync, create the ``airflow`` database."""
        binaries = postgres_bin()
        assert binaries, "PostgreSQL is not installed (ensure_debian_packages)"
        self.data.parent.chmod(0o711)  # mkdtemp's 0700 would keep the postgres user out
        self.data.mkdir(mode=0o700)
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres", "postgres")
        subprocess.run(self._as_owner(str(binaries / "initdb"), "-D", str(self.data), "-U", "airflow", "-A", "trust",
                                      "-E", "UTF8", "--no-sync"), check=True, stdout=subprocess.DEVNULL, cwd=self.data)
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data} -F -c max_connections=200"
        subprocess.run(self._as_owner(str(binaries / "pg_ctl"), "-D", str(self.data), "-l", str(self.data / "log"),
                                      "-w", "-t", "60", "-o", options, "start"), check=True, stdout=subprocess.DEVNULL,
                       cwd=self.data)
        subprocess.run([str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "airflow",
                        "airflow"], check=True)

    def stop(self) -> None:
        """Stop the cluster (fast shutdown) and remove its files."""
        binaries = postgres_bin()
        if binaries and (self.data / "postmaster.pid").exists():
            subprocess.run(self._as_owner(str(binaries / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"),
                           check=False, stdout=subprocess.DEVNULL, cwd=self.data)
        shutil.rmtree(self.data.parent, ignore_errors=True)


@dataclass
class Redis:
    """``redis-server`` on a free loopback port, in memory only."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Celery broker URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start and wait until it answers PING."""
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)


class CeleryAirflow(AirflowServices):
    """api-server, scheduler, dag-processor and one Celery worker per queue (``WORKERS``)."""

    components = ("api-server", "scheduler", "dag-processor")

    def start(self, timeout_s: float = 180) -> None:
        """Migrate the Postgres DB, start the components and the workers, wait for the API and the workers."""
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        for name in self.components:
            self._spawn(name, ["airflow", name], self.env)
        for queue, hostname in WORKERS.items():
            env = {**self.env, "LORA_DEPLOY_WORKER_HOSTNAME": hostname}
            self._spawn(hostname, ["airflow", "celery", "worker", "--queues", queue, "--concurrency", "1",
                                   "--celery-hostname", f"{hostname}@%h", "--without-mingle", "--without-gossip",
                                   "--skip-serve-logs"],  # its log server would listen on every interface
                        env)
        from tests.e2e.airflow_services import wait_for

        wait_for(self._healthy, timeout_s=timeout_s, what="the api-server's health endpoint")
        wait_for(self._workers_ready, timeout_s=timeout_s, what="both Celery workers to be ready")
        self.token = self._login()

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = (self.home / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen([sys.executable, "-m", *command], env=env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def _workers_ready(self) -> bool:
        return all("ready." in self.log_tail(hostname, chars=20000) for hostname in WORKERS.values())

    def _login(self) -> str:
        import requests

        response = requests.post(f"{self.url}/auth/token", json={"username": "admin", "password": self.password},
                                 timeout=10)
        response.raise_for_status()
        return response.json()["access_token"]


@dataclass
class Distributed:
    """The running distributed Airflow plus its backing services (stop() stops all)."""

    airflow: CeleryAirflow
    postgres: Postgres
    redis: Redis
    install_s: float

    def stop(self) -> None:
        """Workers and components first, then the broker and the DB."""
        self.airflow.stop()
        self.redis.stop()
        self.postgres.stop()


def start_distributed(home: Path, extra_env: dict[str, str]) -> Distributed:
    """Install what is missing, start Postgres, Redis and a Celery-mode Airflow under ``home``."""
    install_s = ensure_debian_packages()
    postgres = Postgres(data=Path(tempfile.mkdtemp(prefix="lora-deploy-pg-")) / "data")
    redis_server = Redis()
    postgres.start()
    try:
        redis_server.start()
        base = airflow_services(home, {})
        site = home / "site"
        site.mkdir()
        (site / "lora_worker_hostname.py").write_text(HOSTNAME_MODULE)
        env = {**base.env,
               "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
               "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.url,
               "AIRFLOW__CELERY__BROKER_URL": redis_server.url,
               "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + postgres.url.replace("+psycopg2", ""),
               "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
               "AIRFLOW__CORE__HOSTNAME_CALLABLE": "lora_worker_hostname.hostname",
               "AIRFLOW__API_AUTH__JWT_SECRET": json.dumps(os.urandom(16).hex()).strip('"'),
               "PYTHONPATH": os.pathsep.join([str(site), base.env["PYTHONPATH"]]),
               **extra_env}
        services = CeleryAirflow(home=home, port=base.port, env=env, password=base.password)
        try:
            services.start()
        except BaseException:
            services.stop()
            raise
    except BaseException:
        redis_server.stop()
        postgres.stop()
        raise
    return Distributed(airflow=services, postgres=postgres, redis=redis_server, install_s=install_s)
