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


def comfyui_version() -> str:
    """The host's release ("0.3.75", "0.33.0"), read from its comfyui_version.py without importing ComfyUI: for tests
    whose expected outcomes are measured per host (the product itself detects features, never versions)."""
    import re
    with open(os.path.join(comfyui_path(), "comfyui_version.py")) as f:
        return re.search(r"__version__\s*=\s*[\"']([^\"']+)", f.read()).group(1)


def import_comfy(cpu: bool = True):
    """Make ComfyUI importable in this process (CPU unless `cpu` is False). Its `nodes` module must win the
    name `nodes`."""
    path = comfyui_path()
    if path in sys.path:  # (a rank-side import may have appended it last)
        sys.path.remove(path)
    sys.path.insert(0, path)
    import comfy.options
    comfy.options.args_parsing = False
    from comfy.cli_args import args
    args.cpu = cpu
    cached = sys.modules.get("nodes")
    if cached is not None and not os.path.abspath(getattr(cached, "__file__", "") or "").startswith(path):
        del sys.modules["nodes"]  # the pack's own `nodes` package got the name first: ComfyUI's must hold it
    import nodes  # ComfyUI's nodes.py
    assert hasattr(nodes, "common_ksampler"), f"'nodes' resolved to {nodes.__file__}, not ComfyUI's"
    import folder_paths
    # Now that ComfyUI's `nodes` holds the name, put ComfyUI last: it also has a `tests` package,
    # which must not shadow ours in spawned ranks (they inherit sys.path).
    sys.path.remove(path)
    sys.path.append(path)
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


def _terminate_with_parent() -> None:
    """In the server's child before exec: SIGTERM when the test process dies (a pytest killed by a CI timeout never
    runs its fixtures' teardown; the server, and with it its ranks, must not outlive it)."""
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ComfyServer:
    """A headless ComfyUI on 127.0.0.1; stopped by its own process id."""

    def __init__(self, base_dir: str, python: str = sys.executable, extra_args=(), log_path: str | None = None,
                 env: dict | None = None):
        self.base_dir, self.python, self.extra_args = base_dir, python, list(extra_args)
        self.env = env  # added to this process's environment (e.g. TMPDIR: where the server's groups keep files)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(base_dir, "comfyui.log")
        self.proc = None

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base_dir, "--disable-auto-launch", *self.extra_args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=comfyui_path(), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(self.env or {})},
                                     preexec_fn=_terminate_with_parent)
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
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex}, timeout=60)["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.5) -> dict:
        """Poll /history until the prompt finishes (bounded in time and so in request count)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                h = self.get(f"/history/{prompt_id}", timeout=30)
            except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ComfyUI died while running the prompt:\n{self.log_tail()}") from e
                continue  # a busy server answers late; the deadline still bounds the loop
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
        if self.proc:
            # the server's own session (start_new_session): its ranks leave within a second of it and its resource
            # tracker then unlinks what the server left; wait for them, so whatever tears down next (a network
            # namespace, the test) does not kill them half way
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.proc.pid, 0)
                except (ProcessLookupError, PermissionError):
                    break
                time.sleep(0.05)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---- turning a shipped workflow into one that runs here (no umt5, no VAE, CPU ranks) ----------
def load_workflow(name: str) -> dict:
    with open(os.path.join(REPO, "workflows", name)) as f:
        return json.load(f)


def tiny_cpu_variant(api: dict, model_name: str, *, world_size: int = 2, degrees: dict | None = None,
                     dtype: str = "fp32", seed: int = 3, steps: int = 4, width: int = 64, height: int = 64,
                     length: int = 5, prefix: str = "latents/parallel", text_width: int = 4096) -> dict:
    """The shipped graph with the text encoder replaced by the test conditioning node, the VAE decode
    and video save by SaveLatent, and the pack's nodes set for CPU ranks. The pack's nodes and their
    wiring stay exactly as shipped. text_width: the text encoder's embedding width (umt5: 4096; Cosmos' old
    T5-XXL: 1024)."""
    import copy
    degrees = {"cfg": 1, "ulysses": 1, "ring": 1, "tp": 1, "dp": 1, **(degrees or {"ulysses": 2})}
    g = copy.deepcopy(api)
    decoded_from = {}
    for nid, node in list(g.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct in ("CLIPLoader", "DualCLIPLoader", "VAELoader", "ParallelVAELoader"):
            del g[nid]
        elif ct == "CLIPTextEncode":
            g[nid] = {"class_type": "PditTestConditioning", "inputs": {"seed": 100 + int(nid), "tokens": 12,
                                                                       "width": text_width}}
        elif ct == "VAEDecode":
            decoded_from[nid] = inp["samples"]
            del g[nid]
        elif ct == "ParallelConfig":
            inp.update(world_size=world_size, dtype=dtype, device="cpu", attention="sdpa", **degrees)
        elif ct == "ParallelModelLoader":
            inp.update(model_name=model_name, base_precision=dtype)
        elif ct in ("EmptyHunyuanLatentVideo", "EmptyHunyuanVideo15Latent", "EmptyLTXVLatentVideo"):
            inp.update(width=width, height=height, length=length, batch_size=1)
        elif ct == "EmptyCosmosLatentVideo":  # latent frames: (length - 1) // 8 + 1
            inp.update(width=width, height=height, length=length, batch_size=1)
        elif ct == "EmptySD3LatentImage":
            inp.update(width=width, height=height, batch_size=1)
        elif ct in ("ParallelSampler", "KSampler"):
            inp.update(seed=seed, steps=steps, sampler_name="euler", scheduler="simple")
    for nid, node in list(g.items()):
        if node["class_type"].startswith("Save") and node["class_type"] != "SaveLatent":
            src = decoded_from[node["inputs"]["images"][0]]
            g[nid] = {"class_type": "SaveLatent", "inputs": {"samples": src, "filename_prefix": prefix}}
    return g


def native_variant(api: dict, prefix: str = "latents/native", replace: str | None = None) -> dict:
    """The same graph on ComfyUI's native Load Diffusion Model + KSampler: the parity oracle. Every SaveLatent saves
    under `prefix`, or with `replace` given (a graph saving several latents), `replace` in its prefix swapped for
    `prefix`."""
    import copy
    g = copy.deepcopy(api)
    for nid, node in list(g.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "ParallelConfig":
            del g[nid]
        elif ct == "ParallelModelLoader":
            g[nid] = {"class_type": "UNETLoader", "inputs": {"unet_name": inp["model_name"], "weight_dtype": "default"}}
        elif ct == "ParallelSampler":
            node["class_type"] = "KSampler"
        elif ct == "SaveLatent":
            old = inp["filename_prefix"]
            inp["filename_prefix"] = prefix if replace is None else old.replace(replace, prefix, 1)
    return g


def refused_by_class(server, model: str, text_width: int, latent: dict, message: str) -> None:
    """On a host without the file's model class: Parallel Model Loader (2 CPU ranks) in a minimal sampling graph
    fails the prompt with `message` (the refusal by class name)."""
    g = {"4": {"class_type": "ParallelConfig", "inputs": {
             "world_size": 2, "cfg": 1, "ulysses": 2, "ring": 1, "tp": 1, "dp": 1, "dtype": "fp32", "device": "cpu",
             "attention": "sdpa"}},
         "5": {"class_type": "ParallelModelLoader", "inputs": {"model_name": model, "base_precision": "fp32",
                                                              "parallel_config": ["4", 0]}},
         "6": {"class_type": "PditTestConditioning", "inputs": {"seed": 1, "tokens": 12, "width": text_width}},
         "7": latent,
         "8": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 3, "steps": 1, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "simple",
                                                    "positive": ["6", 0], "negative": ["6", 0],
                                                    "latent_image": ["7", 0], "denoise": 1.0}},
         "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "latents/p"}}}
    h = server.wait(server.queue(g), timeout=240)
    assert h["status"]["status_str"] == "error"
    assert message in str(h["status"]), h["status"]


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to API format using the server's node definitions
    (what the frontend does when it queues a drag-and-dropped graph)."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]["input"]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        linked_widgets = {i["name"] for i in node.get("inputs", []) if i.get("widget")}
        widgets = list(node.get("widgets_values", []))
        inputs = {}
        for section in ("required", "optional"):
            for name, spec in info.get(section, {}).items():
                kind = spec[0]
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                # a multi-type input ("FLOAT,INT") is drawn as the widget its widgetType names
                is_widget = (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                             or "widgetType" in opts)
                if name in linked:
                    l = linked[name]
                    inputs[name] = [str(l[1]), l[2]]
                    if is_widget and name in linked_widgets and widgets:  # a widget converted to an input
                        widgets.pop(0)
                    continue
                if is_widget and widgets:
                    inputs[name] = widgets.pop(0)
                    if opts.get("control_after_generate"):
                        widgets.pop(0)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def pack_temp_files(tmpdir: str) -> list:
    """What the pack left in a server's temporary folder (its TMPDIR): group folders, LoRA copies."""
    try:
        return sorted(n for n in os.listdir(tmpdir) if n.startswith("pdit_"))
    except FileNotFoundError:
        return []


def saved_latent(base_dir: str, prefix: str):
    """The newest .latent file SaveLatent wrote under output/<prefix>*, as a tensor."""
    import glob

    from safetensors.torch import load_file
    files = sorted(glob.glob(os.path.join(base_dir, "output", prefix + "*.latent")), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no latent saved under output/{prefix}*")
    return load_file(files[-1])["latent_tensor"], files[-1]


# ---- the VAEs ComfyUI builds at their release widths, tiny, in a server and its ranks ------------------------------
def tiny_vae_env() -> dict:
    """ComfyServer(env=...) for a server (and the ranks it spawns) that builds the Wan 2.2, HunyuanVideo 1.0 / 1.5 and
    Cosmos 1.0 VAEs at synthetic's tiny widths (tests/comfy_site/sitecustomize.py), so write_tiny_wan_vae(version=
    "2.2"), write_tiny_hunyuan_video_vae and write_tiny_cosmos1_vae files load through ComfyUI's own Load VAE and the
    Parallel VAE Loader alike."""
    from parallel_backend.testing import synthetic
    widths = {"wan22": synthetic.TINY_WAN22_VAE, "hunyuan_video": synthetic.TINY_HUNYUAN_VIDEO_VAE,
              "hunyuan_video15": synthetic.TINY_HUNYUAN_VIDEO15_VAE, "cosmos1": synthetic.TINY_COSMOS1_VAE}
    path = [os.path.join(REPO, "tests", "comfy_site")] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return {"PYTHONPATH": os.pathsep.join(path), "PDIT_TEST_VAE_WIDTHS": json.dumps(widths)}


# VAE Decode (Tiled)'s / VAE Encode (Tiled)'s default widgets: what the Parallel VAE Loader's plain decode / encode run
VAE_TILED_DEFAULTS = {"tile_size": 512, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}


def native_vae_nodes(g: dict) -> dict:
    """`g` with each Parallel VAE Loader replaced by Load VAE and plain VAE Decode / Encode by the Tiled nodes at their
    default widgets: the native graph the pack's VAE must equal."""
    import copy
    g = copy.deepcopy(g)
    for nid, node in g.items():
        ct, inp = node["class_type"], node["inputs"]
        if ct == "ParallelVAELoader":
            g[nid] = {"class_type": "VAELoader", "inputs": {"vae_name": inp["vae_name"]}}
        elif ct in ("VAEDecode", "VAEEncode"):
            g[nid] = {"class_type": ct + "Tiled", "inputs": {**inp, **VAE_TILED_DEFAULTS}}
    return g


def saved_image(base_dir: str, prefix: str):
    """The newest IMAGE the test node PditTestSaveImage wrote under output/<prefix>*, as the float tensor it got."""
    import glob

    from safetensors.torch import load_file
    files = sorted(glob.glob(os.path.join(base_dir, "output", prefix + "*.image.safetensors")), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no image saved under output/{prefix}*")
    return load_file(files[-1])["image"]


def keep_vae_nodes(shipped: dict, tiny: dict, prefix: str) -> dict:
    """`tiny` (tiny_cpu_variant of `shipped`) with the shipped graph's VAE loaders and VAE Decode put back (the
    Parallel VAE Loader in fp32) and the decoded frames saved as floats under <prefix>_frames (PditTestSaveImage)."""
    for nid, node in shipped.items():
        if node["class_type"] in ("VAELoader", "VAEDecode"):
            tiny[nid] = node
        elif node["class_type"] == "ParallelVAELoader":
            tiny[nid] = dict(node, inputs={**node["inputs"], "precision": "fp32"})
    decode = next(k for k, v in shipped.items() if v["class_type"] == "VAEDecode")
    tiny["90"] = {"class_type": "PditTestSaveImage", "inputs": {"images": [decode, 0],
                                                               "filename_prefix": prefix + "_frames"}}
    return tiny


def frames_diff(base_dir: str, prefix: str, native_prefix: str, shape: tuple, tol: float) -> float:
    """Max abs diff of the frames keep_vae_nodes saved for the pack's graph and for the native one (asserted <= tol)."""
    frames, ref = (saved_image(base_dir, f"{p}_frames") for p in (prefix, native_prefix))
    assert frames.shape == ref.shape == shape
    diff = (frames - ref).abs().max().item()
    assert diff <= tol, f"{prefix}: Parallel VAE decode vs native VAE Decode (Tiled): {diff:.2e}"
    assert frames.std() > 1e-3  # a real decode, not a constant
    return diff
