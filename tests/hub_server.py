"""A stand-in for the Hugging Face Hub on loopback, for the real `huggingface_hub` client (HF_ENDPOINT).

It serves repositories laid out as directories (`ROOT/ORG/NAME/...`) the way the Hub serves them:
`GET /api/models/ORG/NAME/revision/REV` (the repo's commit and files) and `.../tree/REV`, `HEAD` and `GET`
`/ORG/NAME/resolve/REV/PATH` with `X-Repo-Commit`, `ETag` and `Content-Length`, byte ranges (a
download resumes), 404 with `X-Error-Code: RepoNotFound`, and 403 `GatedRepo` for a repo holding a
file named `.gated`. It counts the bytes it sends per file, and can cut a file's download short
(`cut_once`) or send it slowly (`slow`), to test resuming.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubServer:
    verbose = False

    def __init__(self, root: Path):
        self.root = Path(root)
        self.sent: Counter[str] = Counter()  # "ORG/NAME/PATH" -> bytes sent
        self.ranged: list[str] = []  # files asked for from a byte offset (resumed downloads)
        self.cut_once: dict[str, int] = {}  # "ORG/NAME/PATH" -> cut its next download after this many bytes
        self.slow: dict[str, float] = {}  # "ORG/NAME/PATH" -> send it at this many bytes/s
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def commit(self, repo: str) -> str:
        files = sorted(p.relative_to(self.root / repo).as_posix() for p in (self.root / repo).rglob("*") if p.is_file())
        return hashlib.sha1(json.dumps(files).encode()).hexdigest()

    def files_sent(self, repo: str) -> set[str]:
        return {k[len(repo) + 1:] for k, n in self.sent.items() if k.startswith(repo + "/") and n}


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            if HubServer.verbose:
                super().log_message(*args)

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool):
            path = self.path.split("?", 1)[0]
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if m:
                return self._info(m.group(1))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
            if m:
                return self._info(m.group(1), tree=True)
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if not m:
                return self._error(404, "EntryNotFound")
            repo, _, name = m.groups()
            if not (hub.root / repo).is_dir():
                return self._error(404, "RepoNotFound")
            if (hub.root / repo / ".gated").exists():
                return self._error(403, "GatedRepo")
            f = hub.root / repo / name
            if not f.is_file():
                return self._error(404, "EntryNotFound")
            data = f.read_bytes()
            start = 0
            ranged = re.fullmatch(r"bytes=(\d+)-\d*", self.headers.get("Range", "").strip())
            if ranged and body:
                start = int(ranged.group(1))
                hub.ranged.append(f"{repo}/{name}")
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", hub.commit(repo))
            self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            key = f"{repo}/{name}"
            with hub._lock:
                cut = hub.cut_once.pop(key, None)
            chunk = data[start:] if cut is None else data[start:start + cut]
            rate = hub.slow.get(key)
            step = 4096 if rate else len(chunk) or 1
            for at in range(0, len(chunk), step):  # (at `rate` bytes/s for a file in `slow`)
                try:
                    self.wfile.write(chunk[at:at + step])
                    self.wfile.flush()
                except OSError:  # the client went away
                    return
                with hub._lock:
                    hub.sent[key] += len(chunk[at:at + step])
                if rate:
                    time.sleep(step / rate)
            if cut is not None:
                self.close_connection = True  # the rest never comes: the client must resume

        def _info(self, repo: str, tree: bool = False):
            """The repo's commit and files (`/api/models/REPO/revision/REV`), or its file tree, one
            page (`/api/models/REPO/tree/REV`)."""
            if not (hub.root / repo).is_dir():
                return self._error(404, "RepoNotFound")
            if (hub.root / repo / ".gated").exists():
                return self._error(403, "GatedRepo")
            files = sorted(p.relative_to(hub.root / repo).as_posix() for p in (hub.root / repo).rglob("*")
                           if p.is_file() and p.name != ".gated")
            if tree:
                body = json.dumps([{"type": "file", "path": f, "size": (hub.root / repo / f).stat().st_size,
                                    "oid": hashlib.sha1((hub.root / repo / f).read_bytes()).hexdigest()}
                                   for f in files]).encode()
            else:
                body = json.dumps({"id": repo, "modelId": repo, "sha": hub.commit(repo), "private": False,
                                   "siblings": [{"rfilename": f} for f in files]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def _error(self, status: int, code: str):
            body = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

    return Handler
