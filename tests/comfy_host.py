"""Finding and driving a real ComfyUI for tests: in-process imports, and a headless server.

The host is $COMFYUI_PATH (any real ComfyUI checkout), else the copy scripts/setup.sh prepares.
Servers listen on 127.0.0.1 only, on a free port, with a temporary --base-directory holding the
pack (symlinked into custom_nodes), the test-only nodes, and the models the test wrote.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "comfyui-parallel-dit"


def comfyui_path() -> str:
    path = os.environ.get("COMFYUI_PATH") or os.path.join(
        os.environ.get("PDIT_HOME", os.path.join(os.path.expanduser("~"), ".cache", "pdit")), "comfyui")
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise RuntimeError(f"no ComfyUI at {path}: run scripts/setup.sh or set COMFYUI_PATH to a ComfyUI checkout")
    return path


def import_comfy():
    """Make ComfyUI importable in this process (CPU). Its `nodes` module must win the name `nodes`."""
    path = comfyui_path()
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options
    comfy.options.args_parsing = False
    from comfy.cli_args import args
    args.cpu = True
    import nodes  # ComfyUI's nodes.py
    assert hasattr(nodes, "common_ksampler"), f"'nodes' resolved to {nodes.__file__}, not ComfyUI's"
    import folder_paths
    return folder_paths


def import_pack(name: str = "pdit_pack"):
    """Import the pack the way ComfyUI does: by file path under a module name of the host's choosing."""
    import importlib.util
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "__init__.py"),
                                                  submodule_search_locations=[REPO])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_base_dir(base: str, models: dict | None = None) -> str:
    """A ComfyUI --base-directory with the pack and the test nodes installed, and `models`
    ({folder: [file paths]}) linked into models/<folder>."""
    for d in ("custom_nodes", "models/diffusion_models", "output", "input", "user", "temp"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    links = {PACK_NAME: REPO, "pdit_test_nodes": os.path.join(REPO, "tests", "comfy_test_nodes")}
    for name, target in links.items():
        dst = os.path.join(base, "custom_nodes", name)
        if not os.path.exists(dst):
            os.symlink(target, dst)
    for folder, files in (models or {}).items():
        os.makedirs(os.path.join(base, "models", folder), exist_ok=True)
        for f in files:
            dst = os.path.join(base, "models", folder, os.path.basename(f))
            if not os.path.exists(dst):
                os.symlink(os.path.abspath(f), dst)
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A headless ComfyUI on 127.0.0.1; stopped by its own process id."""

    def __init__(self, base_dir: str, python: str = sys.executable, extra_args=(), log_path: str | None = None):
        self.base_dir, self.python, self.extra_args = base_dir, python, list(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(base_dir, "comfyui.log")
        self.proc = None

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base_dir, "--disable-auto-launch", *self.extra_args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=comfyui_path(), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def get(self, route: str, timeout: float = 10):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, route: str, payload: dict, timeout: float = 10):
        req = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return json.loads(body) if body else {}
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {route} -> {e.code}: {e.read().decode(errors='replace')}") from None

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.5) -> dict:
        """Poll /history until the prompt finishes (bounded in time and so in request count)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                return h[prompt_id]
            if prompt_id in h and h[prompt_id].get("status", {}).get("status_str") == "error":
                return h[prompt_id]
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt:\n{self.log_tail()}")
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
