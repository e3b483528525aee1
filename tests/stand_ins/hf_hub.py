"""In-memory Hugging Face Hub stand-in that the real ``huggingface_hub`` client talks to over loopback.

Routes follow the client's own requests (huggingface_hub 2.4: ``hf_api.py``, ``_commit_api.py``, ``lfs.py``):
whoami, repo create/delete, README YAML validation, preupload, LFS batch + basic PUT + verify, NDJSON commits,
tags and refs, commits list, repo info, tree, resolve (HEAD/GET), Space variables/secrets/runtime/restart.
Errors carry ``X-Error-Code`` / ``X-Error-Message`` headers and a JSON ``{"error": ...}`` body like the Hub.

The client must run with ``HF_HUB_DISABLE_XET=1`` (no Xet storage here) and ``NO_PROXY=127.0.0.1,localhost``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from tests.stand_ins import StandIn
from tests.stand_ins.hf_hub_http import HubHandler, Raw
from tests.stand_ins.hf_hub_state import LFS_SIZE_THRESHOLD, Blob, HubError, HubState, Repo, now

TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_ID = r"(?P<repo>[\w.-]+/[\w.-]+)"
_API = r"/api/(?P<type>models|datasets|spaces)/" + _ID
_GIT = r"/(?:(?P<prefix>datasets|spaces)/)?" + _ID


class HubStandIn(HubState, StandIn):
    """Threaded HTTP server on 127.0.0.1 with an in-memory Hub. Use as a context manager.

    ``requests`` lists (method, path) of every request, ``responses`` (method, path, status) and
    ``unknown_routes`` the requests no route matched (any path or method), as ``"METHOD /path?query"``; they are
    answered 404 like the Hub. ``token`` is a write token of user ``user`` (namespaces
    ``user`` and ``orgs``), ``read_token`` a read-only one; any other bearer token is answered 401.
    ``space_build_stages`` is the sequence a Space runtime walks through (one step per runtime poll) after a
    commit, a variable/secret change or a restart; ``space_error_message`` the ``errorMessage`` of an error stage.
    :meth:`fail_next` makes the next matching request(s) of a known route answer an error (429, 503, ...).
    """

    def __init__(self, user: str = "lora-tester", orgs: tuple[str, ...] = ("lora-org",)) -> None:
        super().__init__(user, orgs)
        StandIn.__init__(self)
        self.requests: list[tuple[str, str]] = []
        self.responses: list[tuple[str, str, int]] = []
        self.faults: list[dict[str, Any]] = []
        self._sig = secrets.token_hex(8)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.routes: list[tuple[str, re.Pattern[str], Callable[..., Any]]] = [
            (m, re.compile(p + "$"), h)
            for m, p, h in [
                ("GET", r"/api/whoami-v2", self._whoami),
                ("POST", r"/api/repos/create", self._create_repo),
                ("DELETE", r"/api/repos/delete", self._delete_repo),
                ("POST", r"/api/validate-yaml", self._validate_yaml),
                ("POST", _API + r"/preupload/(?P<rev>[^/]+)", self._preupload),
                ("POST", _GIT + r"\.git/info/lfs/objects/batch", self._lfs_batch),
                ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self._lfs_put),
                ("POST", _GIT + r"\.git/info/lfs/objects/verify", self._lfs_verify),
                ("POST", _API + r"/commit/(?P<rev>[^/]+)", self._commit),
                ("POST", _API + r"/tag/(?P<rev>[^/]+)", self._create_tag),
                ("POST", _API + r"/branch/(?P<branch>[^/]+)", self._create_branch),
                ("DELETE", _API + r"/branch/(?P<branch>[^/]+)", self._delete_branch),
                ("DELETE", _API + r"/tag/(?P<tag>[^/]+)", self._delete_tag),
                ("GET", _API + r"/refs", self._refs),
                ("GET", _API + r"/commits/(?P<rev>[^/]+)", self._list_commits),
                ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?", self._repo_info),
                ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", self._tree),
                ("POST", r"/api/spaces/" + _ID + r"/(?P<kind>secrets|variables)", self._space_kv_set),
                ("DELETE", r"/api/spaces/" + _ID + r"/(?P<kind>secrets|variables)", self._space_kv_delete),
                ("GET", r"/api/spaces/" + _ID + r"/(?P<kind>secrets|variables)", self._space_kv_list),
                ("GET", r"/api/spaces/" + _ID + r"/runtime", self._runtime),
                ("POST", r"/api/spaces/" + _ID + r"/restart", self._restart),
                ("HEAD", _GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
                ("GET", _GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
            ]
        ]

    # ---- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        handler = type("Handler", (HubHandler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="hf-hub-stand-in",
                                        daemon=True)
        self._thread.start()
        self._started()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._stopped()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        assert self._server is not None, "use HubStandIn as a context manager"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, method: str, path_pattern: str, status: int, *, times: int = 1,
                  headers: dict[str, str] | None = None, message: str = "stand-in fault") -> None:
        """Answer the next ``times`` requests ``method`` on a path matching ``path_pattern`` (regex, searched)
        with ``status``, ``headers`` (e.g. ``Retry-After``) and ``message``, before the route runs."""
        with self.lock:
            self.faults.append({"method": method, "pattern": re.compile(path_pattern), "status": status,
                                "times": times, "headers": dict(headers or {}), "message": message})

    def _fault_for(self, method: str, path: str) -> dict[str, Any] | None:
        for fault in self.faults:
            if fault["times"] > 0 and fault["method"] == method and fault["pattern"].search(path):
                fault["times"] -= 1
                return fault
        return None

    # ---- helpers ----------------------------------------------------------------------------------------
    def _repo(self, req: HubHandler, m: dict, *, write: bool = False, repo_type: str | None = None) -> Repo:
        kind = repo_type or TYPES[m.get("type") or m.get("prefix") or "models"]
        return self._find_repo(req.headers.get("Authorization", ""), kind, m["repo"], write=write)

    # ---- routes -----------------------------------------------------------------------------------------
    def _whoami(self, req: HubHandler, m: dict, body: bytes) -> Any:
        role = self._auth(req.headers.get("Authorization", ""), write=False)
        if role is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return {"type": "user", "name": self.user, "orgs": [{"name": o} for o in self.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "stand-in", "role": role}}}

    def _create_repo(self, req: HubHandler, m: dict, body: bytes) -> Any:
        self._auth(req.headers.get("Authorization", ""), write=True)
        data = json.loads(body)
        namespace = data.get("organization") or self.user
        repo_id, kind = f"{namespace}/{data['name']}", data.get("type") or "model"
        url = f"{self.url}/{URL_PREFIX[kind]}{repo_id}"
        self._new_repo(namespace, data["name"], kind, data, url)
        return {"url": url, "name": repo_id, "id": secrets.token_hex(12)}

    def _delete_repo(self, req: HubHandler, m: dict, body: bytes) -> Any:
        self._auth(req.headers.get("Authorization", ""), write=True)
        data = json.loads(body)
        key = (data.get("type") or "model", f"{data.get('organization') or self.user}/{data['name']}")
        if self.repos.pop(key, None) is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return {}

    def _validate_yaml(self, req: HubHandler, m: dict, body: bytes) -> Any:
        self._auth(req.headers.get("Authorization", ""))
        content = json.loads(body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        if match is None:
            return {"errors": [], "warnings": [{"message": "Empty or missing yaml metadata in repo card"}]}
        try:
            meta = yaml.safe_load(match.group(1))
        except yaml.YAMLError as e:
            raise HubError(400, "Invalid YAML", errors=[{"message": f"Invalid YAML: {e}"}]) from e
        errors = []
        if not isinstance(meta, dict):
            errors.append({"message": "metadata must be a YAML mapping"})
        else:
            bases = meta.get("base_model") or []
            for base in [bases] if isinstance(bases, str) else bases:
                if not re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", str(base)):
                    errors.append({"message": f'"base_model" with value "{base}" is not a valid model id'})
            if not isinstance(meta.get("tags", []), list):
                errors.append({"message": '"tags" must be an array'})
        if errors:
            raise HubError(400, "Invalid metadata in README.md", errors=errors)
        return {"errors": [], "warnings": []}

    def _preupload(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m, write=True)
        tip = repo.resolve(unquote(m["rev"]))
        head = tip.files
        patterns = [ln.split()[0] for ln in head.get(".gitattributes", Blob(b"", False)).content.decode().splitlines()
                    if "filter=lfs" in ln]
        result = []
        for item in json.loads(body)["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = (item["size"] >= LFS_SIZE_THRESHOLD or b"\0" in sample
                   or any(fnmatch.fnmatch(item["path"].rsplit("/", 1)[-1], p) for p in patterns))
            existing = head.get(item["path"])
            result.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": existing.oid if existing is not None else None})
        return {"files": result, "commitOid": tip.oid}

    def _lfs_batch(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m, write=True)
        data = json.loads(body)
        if data.get("operation") != "upload" or "basic" not in data.get("transfers", ["basic"]):
            raise HubError(400, "Only basic uploads are supported")
        prefix = f"{self.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}.git/info/lfs/objects/verify"
        objects = []
        for obj in data["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}?size={obj['size']}&sig={self._sig}",
                               "header": {}, "expires_in": 900},
                    "verify": {"href": prefix, "header": {}},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def _lfs_put(self, req: HubHandler, m: dict, body: bytes) -> Any:
        query = parse_qs(urlsplit(req.path).query)
        if query.get("sig") != [self._sig]:
            raise HubError(403, "Request signature does not match")
        if hashlib.sha256(body).hexdigest() != m["oid"] or query.get("size") != [str(len(body))]:
            raise HubError(400, f"Uploaded content does not match oid {m['oid']} / size {query.get('size')}")
        self.lfs_objects[m["oid"]] = body
        return None

    def _lfs_verify(self, req: HubHandler, m: dict, body: bytes) -> Any:
        self._repo(req, m, write=True)
        data = json.loads(body)
        stored = self.lfs_objects.get(data["oid"])
        if stored is None or len(stored) != data["size"]:
            raise HubError(404, f"LFS object {data['oid']} not found")
        return {}

    def _commit(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m, write=True)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of the NDJSON payload must be the header")
        commit = self._apply_commit(repo, lines[0]["value"], lines[1:], unquote(m["rev"]))
        url = f"{self.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{commit.oid}"
        return {"success": True, "commitOid": commit.oid, "commitUrl": url, "hookOutput": ""}

    def _create_tag(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m, write=True)
        tag = json.loads(body)["tag"]
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        if not re.fullmatch(r"[\w][\w.+-]*", tag) or ".." in tag or tag.endswith(".lock"):
            raise HubError(400, f"Invalid tag name {tag!r}")
        repo.tags[tag] = repo.resolve(unquote(m["rev"])).oid
        return {}

    def _create_branch(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m, write=True)
        branch = unquote(m["branch"])
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        if branch in repo.tags or not re.fullmatch(r"[\w][\w.+-]*", branch) or ".." in branch:
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo.branches[branch] = repo.resolve(start).oid
        return {}

    def _delete_branch(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m, write=True)
        branch = unquote(m["branch"])
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        if repo.branches.pop(branch, None) is None:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        return {}

    def _delete_tag(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m, write=True)
        if repo.tags.pop(unquote(m["tag"]), None) is None:
            raise HubError(404, f"Invalid rev id: {unquote(m['tag'])}", "RevisionNotFound")
        return {}

    def _refs(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in repo.branches.items()]
        return {"branches": branches,
                "converts": [], "pullRequests": [],
                "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": o} for t, o in repo.tags.items()]}

    def _list_commits(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m)
        return [{"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                 "authors": [{"user": self.user}]} for c in repo.history(repo.resolve(unquote(m["rev"])))]

    def _repo_info(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m)
        commit = repo.resolve(unquote(m["rev"] or "main"))
        info = {"id": repo.repo_id, "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                "author": repo.repo_id.split("/")[0], "sha": commit.oid, "private": repo.private,
                "disabled": False, "gated": False, "createdAt": repo.created_at, "lastModified": commit.date,
                "likes": 0, "tags": [], "siblings": [{"rfilename": p} for p in sorted(commit.files)]}
        if repo.repo_type == "space":
            info.update(sdk=repo.sdk, runtime=self._runtime_json(repo), subdomain=repo.repo_id.replace("/", "-"),
                        host=f"{self.url}/spaces/{repo.repo_id}")
        return info

    def _tree(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m)
        commit = repo.resolve(unquote(m["rev"]))
        base = (m["path"] or "").strip("/")
        recursive = parse_qs(urlsplit(req.path).query).get("recursive", ["False"])[0].lower() == "true"
        return commit.tree(base, recursive)

    def _space_kv_set(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m, write=True, repo_type="space")
        data = json.loads(body)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", data["key"]):
            raise HubError(400, f"Invalid key {data['key']!r}")
        store = getattr(repo, m["kind"])
        store[data["key"]] = {"value": data["value"], "description": data.get("description"), "updatedAt": now()}
        self._rebuild(repo)
        return self._space_kv_list(req, m, body) if m["kind"] == "variables" else None

    def _space_kv_delete(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m, write=True, repo_type="space")
        getattr(repo, m["kind"]).pop(json.loads(body)["key"], None)
        self._rebuild(repo)
        return self._space_kv_list(req, m, body) if m["kind"] == "variables" else None

    def _space_kv_list(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m, write=True, repo_type="space")
        if m["kind"] == "secrets":  # secret values are write-only
            return {k: {"description": v["description"], "updatedAt": v["updatedAt"]} for k, v in repo.secrets.items()}
        return dict(repo.variables)

    def _runtime(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m, repo_type="space")
        answer = self._runtime_json(repo)
        if len(repo.stages) > 1:
            repo.stages.pop(0)
        return answer

    def _restart(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m, write=True, repo_type="space")
        repo.stages = list(self.space_build_stages)
        repo.error_message = self.space_error_message
        repo.restarts += 1
        return self._runtime_json(repo)

    def _resolve(self, req: HubHandler, m: dict, body: bytes) -> Any:
        repo = self._repo(req, m)
        commit = repo.resolve(unquote(m["rev"]))
        blob = commit.files.get(unquote(m["path"]))
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.oid}"', "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.oid}"', "X-Linked-Size": str(len(blob.content))})
        return Raw(blob.content, headers)
