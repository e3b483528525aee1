"""One scan for secrets in every place a deploy leaves text: logs, the metadata DB, Slack and the Hub.

:func:`assert_no_secrets` reads

- the task logs under ``$AIRFLOW_HOME/logs`` (``dag_id=…/run_id=…/…``), every other log there (dag-processor,
  scheduler) and the components' own logs ``$AIRFLOW_HOME/*.log`` (``tests.e2e.airflow_services`` writes them);
  ``dag.test()`` runs tasks in-process and writes no log file: pass the captured output as ``captured``;
- the XComs and rendered task fields of the runs from the metadata DB, through Airflow's ORM (``XComModel``,
  ``RenderedTaskInstanceFields``): the test process's own DB, or another Airflow's by ``db_url``. The DB is read
  rather than the REST API because the API redacts values it knows to be secret, and would hide a leak;
- the payloads the Slack stand-in received (``SlackReceiver.messages``);
- what reached the Hub stand-in: every commit's title, message and files, the LFS objects, the Spaces' public
  variables and the request paths (a Space's *secrets* are where a token belongs, so they are not scanned);
- any ``extra_paths`` (files, or directories read recursively).

It fails unless it read something (task log text, at least ``min_xcoms`` XComs, a Slack message when ``slack`` is
given, a commit when ``hub`` is given), then fails naming every place each secret was found. A secret is never
printed: the message shows its label and a masked form, and the lines quoted have every secret replaced by its
label.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

MIN_SECRET_CHARS = 8  # shorter strings match by chance
SNIPPET_CHARS = 160


def mask(secret: str) -> str:
    """A form of ``secret`` safe to print: its first four characters (only when long) and its length."""
    head = secret[:4] if len(secret) >= 16 else ""
    return f"{head}…({len(secret)} chars)"


def private_key_lines(key_text: str) -> list[str]:
    """The distinctive lines of a PEM/OpenSSH private key: its base64 body without the BEGIN/END lines and
    without the first body line, which is the same for every unencrypted OpenSSH key of a type."""
    body = [line.strip() for line in key_text.splitlines() if line.strip() and "PRIVATE KEY" not in line]
    return [line for line in body[1:] if len(line) >= MIN_SECRET_CHARS]


def ssh_key_secrets(key_text: str) -> dict[str, str]:
    """Labelled secrets for a private key: one entry per distinctive line."""
    return {f"SSH private key line {n}": line for n, line in enumerate(private_key_lines(key_text), start=2)}


def slack_secrets(webhook_url: str) -> dict[str, str]:
    """Labelled secrets for a Slack webhook: the URL and the token in its path (``T…/B…/…``)."""
    path = urlsplit(webhook_url).path
    return {"Slack webhook URL": webhook_url, "Slack webhook path token": path.removeprefix("/services/")}


def sqlite_url(airflow_home: Path, env: Mapping[str, str] | None = None) -> str:
    """The metadata DB URL of an Airflow whose home is ``airflow_home`` (its env may name another)."""
    return (env or {}).get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN") or f"sqlite:///{airflow_home / 'airflow.db'}"


def _forms(secret: str) -> set[str]:
    """The ways ``secret`` may be written: as is, JSON-escaped, URL-quoted."""
    return {secret, json.dumps(secret)[1:-1], quote(secret, safe=""), quote(secret)}


@dataclass
class ScanReport:
    """What a scan read (counts per kind of place) and where each secret was found."""

    read: dict[str, int] = field(default_factory=dict)
    chars: dict[str, int] = field(default_factory=dict)
    found: dict[str, list[str]] = field(default_factory=dict)

    def count(self, kind: str, text: str | bytes) -> None:
        """Note one place of ``kind`` read, of ``len(text)`` characters."""
        self.read[kind] = self.read.get(kind, 0) + 1
        self.chars[kind] = self.chars.get(kind, 0) + len(text)

    def summary(self) -> str:
        """``kind: n (chars)`` for every kind of place read."""
        return "; ".join(f"{kind}: {n} ({self.chars.get(kind, 0)} chars)" for kind, n in sorted(self.read.items()))


class _Scanner:
    """Looks for every form of every secret in one text or blob at a time, recording where."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        self.secrets = dict(secrets)
        self.forms = {label: sorted(_forms(value), key=len, reverse=True) for label, value in self.secrets.items()}
        self.report = ScanReport()

    def redact(self, text: str) -> str:
        """``text`` with every form of every secret replaced by ``«label»``."""
        for label, forms in self.forms.items():
            for form in forms:
                text = text.replace(form, f"«{label}»")
        return text

    def scan(self, kind: str, where: str, content: str | bytes) -> None:
        """Scan one place: ``kind`` counts it in the report, ``where`` names it in a finding."""
        self.report.count(kind, content)
        for label, forms in self.forms.items():
            if isinstance(content, bytes):
                if any(form.encode() in content for form in forms):
                    self._found(label, where, content.decode(errors="replace"))
            elif any(form in content for form in forms):
                self._found(label, where, content)

    def _found(self, label: str, where: str, text: str) -> None:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1)
                 if any(form in line for form in self.forms[label])]
        if not lines:  # a binary blob, or a secret split across lines
            self.report.found.setdefault(label, []).append(where)
            return
        for n, line in lines[:3]:
            redacted = self.redact(line)
            at = max(0, redacted.find(f"«{label}»") - SNIPPET_CHARS // 2)
            snippet = redacted[at:at + SNIPPET_CHARS].strip()
            self.report.found.setdefault(label, []).append(f"{where} line {n}: …{snippet}…")
        if len(lines) > 3:
            self.report.found[label].append(f"{where}: {len(lines) - 3} more lines")


def _as_text(value: Any) -> str:
    """A DB or payload value as text (JSON unless it is a string already)."""
    return value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)


def _task_log_of(path: Path, dag_ids: set[str], run_ids: set[str] | None) -> bool:
    """True when ``path`` is a task log (``…/dag_id=D/run_id=R/…``) of one of the runs."""
    parts = {part.split("=", 1)[0]: part.split("=", 1)[1] for part in path.parts if "=" in part}
    return parts.get("dag_id") in dag_ids and (run_ids is None or parts.get("run_id") in run_ids)


def _files(root: Path) -> Iterator[Path]:
    """``root`` if a file, else the files under it (none when it does not exist)."""
    if root.is_file():
        yield root
    elif root.is_dir():
        yield from sorted(p for p in root.rglob("*") if p.is_file())


def _scan_logs(scanner: _Scanner, airflow_home: Path, dag_ids: set[str], run_ids: set[str] | None,
               captured: Mapping[str, str]) -> int:
    """Scan the logs; return the characters of task log read (files of the runs plus captured output)."""
    task_chars = 0
    for path in _files(airflow_home / "logs"):
        text = path.read_text(errors="replace")
        if _task_log_of(path.relative_to(airflow_home / "logs"), dag_ids, run_ids):
            scanner.scan("task log file", f"task log {path}", text)
            task_chars += len(text)
        else:
            scanner.scan("other Airflow log", f"Airflow log {path}", text)
    for path in sorted(airflow_home.glob("*.log")):
        scanner.scan("component log", f"component log {path}", path.read_text(errors="replace"))
    for name, text in captured.items():
        scanner.scan("captured output", f"captured output {name!r}", text)
        task_chars += len(text)
    return task_chars


@contextmanager
def _session(db_url: str | None) -> Iterator[Any]:
    """An ORM session on this process's Airflow DB (``db_url`` None) or on the DB at ``db_url``."""
    if db_url is None:
        from airflow.utils.session import create_session

        with create_session() as session:
            yield session
        return
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    engine = create_engine(db_url)
    try:
        with Session(engine) as session:
            yield session
    finally:
        engine.dispose()


def _scan_db(scanner: _Scanner, db_url: str | None, dag_ids: set[str], run_ids: set[str] | None) -> None:
    """Scan the XComs and rendered task fields of the runs."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as RTIF
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    with _session(db_url) as session:  # columns, not entities: no joins to the runs and task instances
        query = select(XComModel.dag_id, XComModel.run_id, XComModel.task_id, XComModel.map_index, XComModel.key,
                       XComModel.value).where(XComModel.dag_id.in_(dag_ids))
        if run_ids is not None:
            query = query.where(XComModel.run_id.in_(run_ids))
        for x in session.execute(query):
            scanner.scan("XCom", f"XCom {x.dag_id}/{x.run_id}/{x.task_id}[{x.map_index}] key {x.key!r}",
                         _as_text(x.value))
        query = select(RTIF.dag_id, RTIF.run_id, RTIF.task_id, RTIF.map_index, RTIF.rendered_fields,
                       RTIF.k8s_pod_yaml).where(RTIF.dag_id.in_(dag_ids))
        if run_ids is not None:
            query = query.where(RTIF.run_id.in_(run_ids))
        for r in session.execute(query):
            where = f"rendered fields of {r.dag_id}/{r.run_id}/{r.task_id}[{r.map_index}]"
            scanner.scan("rendered task fields", where, _as_text(r.rendered_fields))
            if r.k8s_pod_yaml:
                scanner.scan("rendered task fields", f"{where} (pod yaml)", _as_text(r.k8s_pod_yaml))


def _scan_slack(scanner: _Scanner, slack: Any) -> None:
    """Every payload the Slack stand-in received."""
    for n, message in enumerate(slack.messages, start=1):
        scanner.scan("Slack message", f"Slack message #{n}", _as_text(message))


def _scan_hub(scanner: _Scanner, hub: Any) -> None:
    """Every commit (title, message, files), LFS object, public Space variable and request URL of the stand-in."""
    with hub.lock:
        repos = list(hub.repos.values())
        lfs = dict(hub.lfs_objects)
        requests = [f"{method} {path}" for method, path in getattr(hub, "requests", [])]  # HubStandIn only
        requests += list(getattr(hub, "unknown_routes", []))  # these keep their query strings
    for repo in repos:
        name = f"Hub {repo.repo_type} {repo.repo_id}"
        for commit in repo.commits:
            scanner.scan("Hub commit", f"{name} commit {commit.oid[:12]} title/message",
                         f"{commit.title}\n{commit.message}")
            for path, blob in sorted(commit.files.items()):
                scanner.scan("Hub file", f"{name} commit {commit.oid[:12]} file {path}", blob.content)
        for key, item in sorted(repo.variables.items()):
            scanner.scan("Hub Space variable", f"{name} variable {key}", _as_text(item))
    for oid, content in sorted(lfs.items()):
        scanner.scan("Hub LFS object", f"Hub LFS object {oid[:12]}", content)
    scanner.scan("Hub request URLs", "Hub request URLs", "\n".join(requests))


def assert_no_secrets(secrets: Mapping[str, str] | Iterable[str], *, dag_ids: str | Iterable[str],
                      run_ids: Iterable[str] | None = None, airflow_home: Path | None = None,
                      db_url: str | None = None, captured: Mapping[str, str] | None = None, slack: Any = None,
                      hub: Any = None, extra_paths: Iterable[Path] = (), min_xcoms: int = 1) -> ScanReport:
    """Fail if any secret is in any place the runs of ``dag_ids`` (``run_ids``: only those runs) left text.

    :param secrets: ``{label: secret}`` (or bare secrets, labelled ``secret #n``); each at least 8 characters.
    :param airflow_home: the Airflow home whose ``logs/`` (and ``*.log``) to read; default ``$AIRFLOW_HOME``.
    :param db_url: the metadata DB to read; default this process's (``dag.test()`` runs). For a running local
        Airflow: :func:`sqlite_url`.
    :param captured: ``{name: text}`` of output captured in-process (``dag.test()``: capfd, caplog); it counts as
        task log.
    :param slack: the Slack stand-in (``SlackReceiver``); at least one message is then required.
    :param hub: the Hub stand-in (``HubStandIn``); at least one commit is then required.
    :param extra_paths: more files or directories to read.
    :param min_xcoms: the XComs the runs must have left (0 for a run that failed before any task returned).
    :returns: the report of what was read (``read``: places per kind).
    """
    labelled = dict(secrets) if isinstance(secrets, Mapping) else {
        f"secret #{n}": value for n, value in enumerate(secrets, start=1)}
    assert labelled, "no secrets to look for"
    short = [label for label, value in labelled.items() if len(value) < MIN_SECRET_CHARS]
    assert not short, f"secrets shorter than {MIN_SECRET_CHARS} characters would match by chance: {short}"
    dags = {dag_ids} if isinstance(dag_ids, str) else set(dag_ids)
    runs = None if run_ids is None else set(run_ids)
    home = airflow_home or Path(os.environ["AIRFLOW_HOME"])
    scanner = _Scanner(labelled)

    task_chars = _scan_logs(scanner, home, dags, runs, captured or {})
    _scan_db(scanner, db_url, dags, runs)
    if slack is not None:
        _scan_slack(scanner, slack)
    if hub is not None:
        _scan_hub(scanner, hub)
    for root in extra_paths:
        for path in _files(root):
            scanner.scan("extra file", f"file {path}", path.read_bytes())

    report = scanner.report
    read = report.summary() or "nothing"
    missing = []
    if not task_chars:
        missing.append(f"no task log text (no non-empty task log of {sorted(dags)} under {home / 'logs'}, "
                       "no captured output)")
    if report.read.get("XCom", 0) < min_xcoms:
        missing.append(f"{report.read.get('XCom', 0)} XComs of {sorted(dags)} runs {sorted(runs or ['*'])} in the "
                       f"metadata DB (at least {min_xcoms} expected)")
    if slack is not None and not report.read.get("Slack message"):
        missing.append("no Slack message")
    if hub is not None and not report.read.get("Hub commit"):
        missing.append("no Hub commit")
    assert not missing, "the secret scan read too little to prove anything: " + "; ".join(missing) + f". Read: {read}"
    if report.found:
        lines = [f"{label} ({mask(labelled[label])}) found in:\n  " + "\n  ".join(places)
                 for label, places in report.found.items()]
        raise AssertionError(scanner.redact("secrets leaked:\n" + "\n".join(lines) + f"\nRead: {read}"))
    return report
