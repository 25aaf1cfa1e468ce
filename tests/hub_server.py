"""A stand-in Hugging Face Hub on 127.0.0.1 for the tests: the real `huggingface_hub` and `datasets`
clients talk to it over HTTP (selected with HF_ENDPOINT), so nothing is downloaded and nothing in
those libraries is patched.

It serves model and dataset repos held in memory (files given as bytes, text or a folder), with
the endpoints those clients call:

- repo info: GET /api/{models|datasets}/{repo}[/revision/{rev}] (sha, siblings, gated, private);
- listings: GET /api/{type}s/{repo}/tree/{rev}[/{path}] (?recursive), POST .../paths-info/{rev},
  GET .../refs, GET .../commits/{rev};
- files: HEAD/GET /{repo}/resolve/{rev}/{path} and /datasets/{repo}/resolve/{rev}/{path} with
  X-Repo-Commit, ETag (git blob sha1, or sha256 for LFS-sized files, as the Hub does), Content-Length
  and byte ranges (resumed downloads, HfFileSystem reads);
- revisions: branches, tags and commit shas (full or a 7+ character prefix);
- errors shaped as the Hub's: 404 + X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound,
  401 + GatedRepo for a gated repo's files without an accepted token;
- uploads: POST /api/repos/create, .../preupload/{rev} (every file "regular": no LFS/Xet storage is
  served, so the commit carries each file base64-encoded), .../commit/{rev} (ndjson), .../branch/{b},
  POST /api/validate-yaml (a model card's metadata), GET /api/whoami-v2.

Every request is logged in `requests` (method, path) so a test can check what a client fetched.
Unknown routes answer 404 and are kept in `unhandled`, to spot an endpoint a client version added.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".parquet", ".arrow", ".msgpack", ".h5")
LFS_MIN_BYTES = 10 * 1024 * 1024
_TYPES = {"models": "model", "datasets": "dataset"}
_DATE = "2026-01-01T00:00:00.000Z"


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str, data: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_BYTES


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    title: str
    parent: str | None

    def entry(self, path: str) -> dict:
        data = self.files[path]
        entry = {"type": "file", "oid": _git_blob_sha(data), "size": len(data), "path": path}
        if _is_lfs(path, data):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if _is_lfs(path, data) else _git_blob_sha(data)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch, a tag, or a commit sha (a prefix of 7+ characters too), as the Hub resolves them."""
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
            sha = next((s for s in self.commits if s.startswith(revision)), None)
        return self.commits.get(sha) if sha else None


def _read_files(files: dict[str, bytes | str] | str | Path) -> dict[str, bytes]:
    if isinstance(files, (str, Path)):
        root = Path(files)
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return {path: data.encode() if isinstance(data, str) else bytes(data) for path, data in files.items()}


class StandInHub:
    """The repos and the server. `url` is what HF_ENDPOINT is set to."""

    def __init__(self, tokens: tuple[str, ...] = ("hf_stand_in_token",)):
        self.tokens = set(tokens)  # accepted for gated/private repos and uploads
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="stand-in-hub", daemon=True)

    def start(self) -> StandInHub:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        """Forget every repo and request (between tests)."""
        with self._lock:
            self.repos.clear()
            self.requests.clear()
            self.unhandled.clear()

    # ---- building repos (what a test calls) --------------------------------------------------

    def create_repo(self, repo_id: str, files: dict[str, bytes | str] | str | Path | None = None, *,
                    repo_type: str = "model", private: bool = False, gated: bool = False,
                    message: str = "initial commit") -> str:
        """A new repo whose `main` holds `files` (a dict path -> content, or a folder); its commit sha."""
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise ValueError(f"stand-in hub: {repo_type} repo {repo_id} exists")
            self.repos[(repo_type, repo_id)] = Repo(repo_id, repo_type, private=private, gated=gated)
        return self.commit(repo_id, {".gitattributes": "*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
                                     **_read_files(files or {})}, repo_type=repo_type, message=message)

    def commit(self, repo_id: str, files: dict[str, bytes | str] | str | Path, *, repo_type: str = "model",
               branch: str = "main", delete: tuple[str, ...] = (), message: str = "update") -> str:
        """Add/replace `files` (and remove `delete`) on `branch` (created from main when new); the new sha."""
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            parent = repo.branches.get(branch) or repo.branches.get("main")
            tree = dict(repo.commits[parent].files) if parent else {}
            for path in delete:
                tree = {p: d for p, d in tree.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
            tree.update(_read_files(files))
            digest = hashlib.sha1(json.dumps([parent, message, sorted((p, _git_blob_sha(d)) for p, d in tree.items())])
                                  .encode()).hexdigest()
            repo.commits[digest] = Commit(digest, tree, message, parent)
            repo.branches[branch] = digest
            return digest

    def tag(self, repo_id: str, tag: str, revision: str = "main", *, repo_type: str = "model") -> str:
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            sha = repo.resolve(revision).sha  # type: ignore[union-attr]
            repo.tags[tag] = sha
            return sha

    def files_at(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        """A revision's files (what an upload left there)."""
        commit = self.repos[(repo_type, repo_id)].resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id}@{revision}")
        return dict(commit.files)

    def fetched(self, repo_id: str, *, repo_type: str = "model") -> list[str]:
        """The repo files clients downloaded (GET of resolve URLs), in request order."""
        prefix = ("/datasets/" if repo_type == "dataset" else "/") + repo_id + "/resolve/"
        return [unquote(p[len(prefix):].split("?")[0].split("/", 1)[1]) for m, p in self.requests
                if m == "GET" and p.startswith(prefix)]


class _Error(Exception):
    def __init__(self, status: int, code: str | None, message: str, **body):
        super().__init__(message)
        self.status, self.code, self.message, self.body = status, code, message, body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stand-in-hub"

    def log_message(self, format, *args):  # keep test output clean
        pass

    @property
    def hub(self) -> StandInHub:
        return self.server.hub  # type: ignore[attr-defined]

    # ---- dispatch --------------------------------------------------------------------------------

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        raw_path = urlsplit(self.path).path
        self.query = parse_qs(urlsplit(self.path).query)
        with self.hub._lock:
            self.hub.requests.append((method, self.path))
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
        try:
            routed = self._route(method, raw_path)
            if routed is None:
                with self.hub._lock:
                    self.hub.unhandled.append((method, self.path))
                raise _Error(404, None, f"stand-in hub: no route for {method} {raw_path}")
        except _Error as e:
            self._send(e.status, json.dumps({"error": e.message, **e.body}).encode(), "application/json",
                       {**({"X-Error-Code": e.code} if e.code else {}), "X-Error-Message": e.message},
                       head=method == "HEAD")

    def _route(self, method: str, raw: str):
        parts = raw.strip("/").split("/")
        if parts[:2] == ["api", "whoami-v2"]:
            return self._whoami()
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if parts[0] == "api" and len(parts) >= 3 and parts[1] in _TYPES:
            return self._api(method, _TYPES[parts[1]], parts[2:])
        repo_type = "model"
        if parts[0] == "datasets":
            repo_type, parts = "dataset", parts[1:]
        if "resolve" in parts and method in ("GET", "HEAD"):
            i = parts.index("resolve")
            if i in (1, 2) and len(parts) > i + 2:
                return self._resolve(method, repo_type, "/".join(parts[:i]), unquote(parts[i + 1]),
                                     unquote("/".join(parts[i + 2:])))
        return None

    def _split_repo(self, repo_type: str, parts: list[str]) -> tuple[str, list[str]]:
        """`org/name/rest...` or `name/rest...`: the longest repo id that exists (else org/name)."""
        for n in (2, 1):
            if len(parts) >= n and (repo_type, "/".join(parts[:n])) in self.hub.repos:
                return "/".join(parts[:n]), parts[n:]
        return "/".join(parts[:2]), parts[2:]

    def _api(self, method: str, repo_type: str, parts: list[str]):
        repo_id, rest = self._split_repo(repo_type, parts)
        action = rest[0] if rest else ""
        if method == "POST" and action == "preupload":
            return self._preupload(repo_type, repo_id, unquote(rest[1]) if len(rest) > 1 else "main")
        if method == "POST" and action == "commit":
            return self._commit(repo_type, repo_id, unquote(rest[1]) if len(rest) > 1 else "main")
        if method == "POST" and action == "branch":
            return self._create_branch(repo_type, repo_id, unquote("/".join(rest[1:])))
        if method == "POST" and action == "paths-info":
            return self._paths_info(repo_type, repo_id, unquote(rest[1]) if len(rest) > 1 else "main")
        if method != "GET":
            return None
        if action in ("", "revision"):
            return self._info(repo_type, repo_id, unquote("/".join(rest[1:])) if rest else "main")
        if action == "tree":
            return self._tree(repo_type, repo_id, unquote(rest[1]) if len(rest) > 1 else "main",
                              unquote("/".join(rest[2:])))
        if action == "refs":
            return self._refs(repo_type, repo_id)
        if action == "commits":
            return self._commits(repo_type, repo_id, unquote(rest[1]) if len(rest) > 1 else "main")
        return None

    # ---- helpers -----------------------------------------------------------------------------------

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and self._token() not in self.hub.tokens):
            raise _Error(404, "RepoNotFound", "Repository not found")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _Error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None,
              *, head: bool = False) -> bool:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)
        return True

    def _json(self, value, status: int = 200) -> bool:
        return self._send(status, json.dumps(value).encode(), "application/json")

    # ---- reading -----------------------------------------------------------------------------------

    def _info(self, repo_type: str, repo_id: str, revision: str):
        repo = self._repo(repo_type, repo_id)
        commit = self._commit_of(repo, revision or "main")
        author = repo_id.split("/")[0] if "/" in repo_id else None
        return self._json({
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "author": author,
            "sha": commit.sha, "lastModified": _DATE, "createdAt": _DATE, "private": repo.private,
            "gated": "auto" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "cardData": {}, "usedStorage": sum(len(d) for d in commit.files.values()),
            "siblings": [{"rfilename": p, "size": len(d)} for p, d in sorted(commit.files.items())],
        })

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str):
        commit = self._commit_of(self._repo(repo_type, repo_id), revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise _Error(404, "EntryNotFound", f"{path} does not exist on {revision}")
        entries, folders = [], set()
        for p in sorted(commit.files):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):].split("/")
            for depth in range(1, len(rel)):  # the folders on the way
                folder = prefix + "/".join(rel[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                    "size": 0, "path": folder})
            if recursive or len(rel) == 1:
                entries.append(commit.entry(p))
        return self._json(entries)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str):
        commit = self._commit_of(self._repo(repo_type, repo_id), revision)
        form = parse_qs(self.body.decode())
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                out.append(commit.entry(path))
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0,
                            "path": path})
        return self._json(out)

    def _refs(self, repo_type: str, repo_id: str):
        repo = self._repo(repo_type, repo_id)

        def refs(table: dict[str, str], kind: str) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s} for n, s in sorted(table.items())]
        return self._json({"branches": refs(repo.branches, "heads"), "tags": refs(repo.tags, "tags"),
                           "converts": []})

    def _commits(self, repo_type: str, repo_id: str, revision: str):
        repo = self._repo(repo_type, repo_id)
        commit, out = self._commit_of(repo, revision), []
        while commit is not None:
            out.append({"id": commit.sha, "title": commit.title, "message": "", "date": _DATE,
                        "authors": [{"user": "stand-in"}]})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return self._json(out)

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str):
        repo = self._repo(repo_type, repo_id)
        commit = self._commit_of(repo, revision)
        if path not in commit.files:
            raise _Error(404, "EntryNotFound", f"{path} does not exist on {revision}")
        if repo.gated and self._token() not in self.hub.tokens:
            raise _Error(401, "GatedRepo", f"Access to {repo_type} {repo_id} is restricted. You must have access "
                                           "to it and be authenticated to access it. Please log in.")
        data, etag = commit.files[path], commit.etag(path)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(0))}
        if _is_lfs(path, data):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        status, span = 200, data
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
        if match and data:
            start = int(match[1]) if match[1] else max(0, len(data) - int(match[2] or 0))
            end = int(match[2]) if match[1] and match[2] else len(data) - 1
            if start >= len(data):
                return self._send(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"},
                                  head=method == "HEAD")
            status, span = 206, data[start:min(end, len(data) - 1) + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(span) - 1}/{len(data)}"
        return self._send(status, span, "application/octet-stream", headers, head=method == "HEAD")

    # ---- writing -----------------------------------------------------------------------------------

    def _require_write(self) -> None:
        if self._token() not in self.hub.tokens:
            raise _Error(401, None, "Invalid credentials in Authorization header")

    def _whoami(self):
        self._require_write()
        return self._json({"type": "user", "name": "stand-in", "fullname": "Stand-in user", "orgs": [],
                           "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def _create_repo(self):
        self._require_write()
        payload = json.loads(self.body or b"{}")
        repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
        repo_type = payload.get("type") or "model"
        url = f"{self.hub.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:  # the Hub's 409 carries the url (exist_ok reads it)
            raise _Error(409, None, f"You already created this {repo_type} repo", url=url)
        self.hub.create_repo(repo_id, repo_type=repo_type,
                             private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return self._json({"url": url, "name": repo_id})

    def _validate_yaml(self):
        """A model card's metadata block must be a YAML mapping (the Hub checks more: a bad card is a 400)."""
        import yaml
        content = json.loads(self.body).get("content", "")
        match = re.match(r"^---\n(.*?)\n---", content, re.S)
        try:
            meta = yaml.safe_load(match[1]) if match else {}
        except yaml.YAMLError as e:
            raise _Error(400, None, f"Invalid YAML: {e}") from e
        if not isinstance(meta, dict):
            raise _Error(400, None, "the metadata block is not a mapping")
        return self._json({"errors": [], "warnings": []})

    def _preupload(self, repo_type: str, repo_id: str, revision: str):
        self._require_write()
        self._repo(repo_type, repo_id)
        files = json.loads(self.body).get("files", [])
        return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                     for f in files], "commitOid": None})

    def _create_branch(self, repo_type: str, repo_id: str, branch: str):
        self._require_write()
        repo = self._repo(repo_type, repo_id)
        if branch in repo.branches:
            raise _Error(409, None, f"Reference already exists: refs/heads/{branch}")
        start = json.loads(self.body or b"{}").get("startingPoint") or "main"
        with self.hub._lock:
            repo.branches[branch] = self._commit_of(repo, start).sha
        return self._json({})

    def _commit(self, repo_type: str, repo_id: str, revision: str):
        self._require_write()
        repo = self._repo(repo_type, repo_id)
        if revision not in repo.branches:
            raise _Error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        summary = "update"
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value.get("summary") or summary
            elif item["key"] == "file":
                content = value["content"]
                added[value["path"]] = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise _Error(400, None, f"stand-in hub: commit operation {item['key']} is not served (no LFS storage)")
        sha = self.hub.commit(repo_id, added, repo_type=repo_type, branch=revision, delete=tuple(deleted),
                              message=summary)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return self._json({"commitUrl": f"{self.hub.url}/{prefix}{repo_id}/commit/{sha}", "commitOid": sha,
                           "pullRequestUrl": None, "success": True})
