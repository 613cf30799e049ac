"""A local stand-in for the Hub's upload endpoints, and a runner for scripts that must see HF_* variables
at import time (huggingface_hub reads them once)."""

import base64
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def run_python(script: str, env: dict, args: tuple = ()) -> str:
    """Run a script (source text, or a file path with `args`) in a fresh interpreter; return its stdout."""
    command = [sys.executable, script, *args] if script.endswith(".py") else [sys.executable, "-c", textwrap.dedent(script)]
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


class RecordingHub:
    """What the clients sent: created repos, the card sent for YAML validation, every committed file."""

    def __init__(self) -> None:
        self.repos: list[str] = []
        self.card: str | None = None
        self.uploaded: dict[str, bytes] = {}
        self.env: dict[str, str] = {}


@contextlib.contextmanager
def recording_hub():
    """Serve create_repo, validate-yaml, preupload and commit on 127.0.0.1 (every file as a 'regular' upload)."""
    hub = RecordingHub()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            host = f"http://{self.headers['Host']}"
            if self.path == "/api/repos/create":
                request = json.loads(body)
                repo_id = f"{request.get('organization') or 'me'}/{request['name']}"
                hub.repos.append(repo_id)
                self._reply({"url": f"{host}/{repo_id}", "name": repo_id})
            elif self.path == "/api/validate-yaml":
                hub.card = json.loads(body)["content"]
                self._reply({"warnings": [], "errors": []})
            elif "/preupload/" in self.path:
                files = json.loads(body)["files"]
                self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]})
            elif "/commit/" in self.path:
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        hub.uploaded[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                self._reply({"commitUrl": f"{host}/{hub.repos[-1]}/commit/{'1' * 40}", "commitOid": "1" * 40})
            else:
                self.send_error(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # online (CI exports HF_HUB_OFFLINE=1), but only towards this local endpoint
    hub.env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0"}
    try:
        yield hub
    finally:
        server.shutdown()
