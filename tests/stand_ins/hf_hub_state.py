"""Data model of the in-memory Hugging Face Hub stand-in: repos, commits, blobs, LFS objects, tokens and errors.

``HubState`` holds everything the HTTP layer (``tests.stand_ins.hf_hub``) reads and changes, and the state
operations it performs (authorisation, repo lookup and creation, commits, Space rebuilds). Tests inspect it through
``HubStandIn``, which is a ``HubState``. Failures are ``HubError``s carrying the status and message the Hub answers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.bin", "*.gguf", "*.safetensors", "*.pt", "*.pth", "*.onnx", "*.zip", "*.tar.gz", "*.npy")
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024


def now() -> str:
    """Current UTC time in the Hub's timestamp format."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def git_sha1(data: bytes) -> str:
    """Git blob sha1 of ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An error response: status, message (X-Error-Message and JSON body) and optional X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


@dataclass
class Blob:
    """One file in a commit tree."""

    content: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """sha256 for LFS files, git blob sha1 for regular ones (what the client compares against)."""
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_sha1(self.content)


@dataclass
class Commit:
    """A commit: id, messages and the full file tree after it."""

    oid: str
    title: str
    message: str
    date: str
    files: dict[str, Blob]
    parent: str = ""

    def tree(self, base: str, recursive: bool) -> list[dict]:
        """Tree entries under folder ``base`` ("" for the root), one level deep unless ``recursive``."""
        entries: dict[str, dict] = {}
        for path, blob in sorted(self.files.items()):
            if base and not path.startswith(base + "/"):
                continue
            rest = path[len(base) + 1:] if base else path
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(([base] if base else []) + parts[:depth])
                if depth == 1 or recursive:
                    entries.setdefault(folder, {"type": "directory", "oid": git_sha1(folder.encode()),
                                                "size": 0, "path": folder})
            if len(parts) == 1 or recursive:
                entry: dict[str, Any] = {"type": "file", "oid": git_sha1(blob.content), "size": len(blob.content),
                                         "path": path}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.oid, "size": len(blob.content), "pointerSize": 134}
                entries[path] = entry
        if base and not entries:
            raise HubError(404, f"Entry not found: {base}", "EntryNotFound")
        return list(entries.values())


@dataclass
class Repo:
    """State of one repository, inspectable by tests."""

    repo_id: str
    repo_type: str
    private: bool
    sdk: str | None = None
    hardware: str | None = None
    commits: list[Commit] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    variables: dict[str, dict] = field(default_factory=dict)
    secrets: dict[str, dict] = field(default_factory=dict)
    stages: list[str] = field(default_factory=lambda: ["NO_APP_FILE"])
    error_message: str | None = None
    restarts: int = 0
    created_at: str = field(default_factory=now)

    @property
    def head(self) -> Commit:
        """Tip of ``main``."""
        return self.commit(self.branches["main"])

    def commit(self, oid: str) -> Commit:
        """The commit with id ``oid``."""
        return next(c for c in self.commits if c.oid == oid)

    def history(self, tip: Commit) -> list[Commit]:
        """``tip`` and its ancestors, newest first."""
        chain = [tip]
        while chain[-1].parent:
            chain.append(self.commit(chain[-1].parent))
        return chain

    @property
    def files(self) -> dict[str, bytes]:
        """Current content of ``main``: path -> bytes."""
        return {path: blob.content for path, blob in self.head.files.items()}

    @property
    def stage(self) -> str:
        """Current Space runtime stage."""
        return self.stages[0]

    def resolve(self, revision: str) -> Commit:
        """Commit for a branch, tag or (short) commit id, else RevisionNotFound."""
        if revision in self.branches:
            return self.commit(self.branches[revision])
        oid = self.tags.get(revision, revision)
        found = [c for c in self.commits if len(oid) >= 7 and c.oid.startswith(oid)]
        if not found:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return found[-1]


class HubState:
    """The in-memory Hub: repos by (type, id), LFS objects by sha256, user ``user`` with namespaces ``user`` and
    ``orgs``, a write ``token`` and a read-only ``read_token``. ``lock`` guards every access from request threads;
    ``space_build_stages`` is the sequence a Space runtime walks through after a rebuild.
    """

    def __init__(self, user: str, orgs: tuple[str, ...]) -> None:
        self.user, self.orgs = user, orgs
        self.token = "hf_" + secrets.token_hex(16)
        self.read_token = "hf_" + secrets.token_hex(16)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.space_build_stages = ["BUILDING", "RUNNING"]
        self.space_error_message: str | None = None
        self.lock = threading.RLock()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """State of an existing repo (KeyError when it does not exist)."""
        return self.repos[(repo_type, repo_id)]

    def _auth(self, header: str, *, write: bool = False) -> str | None:
        """Role of the caller's Authorization ``header`` (None when anonymous); 401 for an unknown token."""
        if not header:
            if write:
                raise HubError(401, "You must be authenticated to access this resource")
            return None
        token = header.removeprefix("Bearer ").strip()
        role = {self.token: "write", self.read_token: "read"}.get(token)
        if role is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        if write and role != "write":
            raise HubError(403, "This token does not have write access. Use a token with the 'write' role")
        return role

    def _find_repo(self, header: str, kind: str, repo_id: str, *, write: bool = False) -> Repo:
        """Repo as seen by the caller: 404 when missing (or private and anonymous), 403 writing outside the
        user's namespaces."""
        role = self._auth(header, write=write)
        repo = self.repos.get((kind, repo_id))
        if repo is None or (repo.private and role is None):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and repo_id.split("/")[0] not in (self.user, *self.orgs):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _new_repo(self, namespace: str, name: str, kind: str, options: dict[str, Any], url: str) -> Repo:
        """Create ``namespace/name`` with the Hub's initial commit from a create payload's ``options``
        (visibility, sdk, hardware, variables, secrets); ``url`` goes into the 409 for an existing repo."""
        repo_id = f"{namespace}/{name}"
        if namespace not in (self.user, *self.orgs):
            raise HubError(403, f"You don't have the rights to create a {kind} under the namespace {namespace!r}")
        if not re.fullmatch(r"[\w][\w.-]{0,95}", name) or ".." in name:
            raise HubError(400, f"Invalid repo name {name!r}")
        if (kind, repo_id) in self.repos:
            raise HubError(409, f"You already created this {kind} repo", url=url)
        if kind == "space" and options.get("sdk") not in ("gradio", "docker", "static", "streamlit"):
            raise HubError(400, f"Invalid sdk {options.get('sdk')!r}")
        repo = Repo(repo_id, kind, options.get("visibility", "public") != "public", options.get("sdk"),
                    options.get("hardware") or ("cpu-basic" if kind == "space" else None))
        files = {".gitattributes": Blob(GITATTRIBUTES.encode(), False)}
        if kind == "space":
            files["README.md"] = Blob(f"---\ntitle: {name}\nsdk: {repo.sdk}\n---\n".encode(), False)
            for key in ("variables", "secrets"):
                for item in options.get(key) or []:
                    getattr(repo, key)[item["key"]] = {"value": item["value"], "updatedAt": now()}
        self.repos[(kind, repo_id)] = repo
        self._add_commit(repo, "initial commit", "", files)
        return repo

    def _apply_commit(self, repo: Repo, header: dict, operations: list[dict], branch: str = "main") -> Commit:
        """Commit NDJSON ``operations`` (file, lfsFile, deletedFile, deletedFolder) on ``branch`` per ``header``."""
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        tip = repo.commit(repo.branches[branch])
        files = dict(tip.files)
        if header.get("parentCommit") and not tip.oid.startswith(header["parentCommit"]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        for line in operations:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(400, f"Your push was rejected because an LFS pointer pointed to a file that "
                                        f"does not exist: {value['path']} ({value['oid']})")
                files[value["path"]] = Blob(self.lfs_objects[value["oid"]], True)
            elif key in ("deletedFile", "deletedFolder"):
                gone = [p for p in files if p == value["path"] or p.startswith(value["path"].rstrip("/") + "/")]
                if not gone:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                for path in gone:
                    del files[path]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        return self._add_commit(repo, header["summary"], header.get("description", ""), files, branch)

    def _runtime_json(self, repo: Repo) -> dict:
        answer = {"stage": repo.stage, "hardware": {"current": repo.hardware, "requested": repo.hardware},
                  "gcTimeout": 172800, "storage": None, "devMode": False}
        if repo.stage.endswith("_ERROR") and repo.error_message:
            answer["errorMessage"] = repo.error_message
        return answer

    def _rebuild(self, repo: Repo) -> None:
        if repo.repo_type == "space" and "app.py" in repo.head.files:
            repo.stages = list(self.space_build_stages)
            repo.error_message = self.space_error_message

    def _add_commit(self, repo: Repo, title: str, message: str, files: dict[str, Blob], branch: str = "main") -> Commit:
        parent = repo.branches.get(branch, "")
        tree = json.dumps({p: [b.oid, b.lfs] for p, b in sorted(files.items())})
        oid = hashlib.sha1(f"{parent}\n{tree}\n{title}\n{message}\n{len(repo.commits)}".encode()).hexdigest()
        commit = Commit(oid, title, message, now(), files, parent)
        repo.commits.append(commit)
        repo.branches[branch] = oid
        if branch == "main":
            self._rebuild(repo)
        return commit
