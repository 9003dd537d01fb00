"""The real ComfyUI frontend in headless Chromium: the shipped UI workflow loads with the pack's nodes
and widgets, and a CPU variant of it queued from the browser finishes. Screenshots are kept."""
import json
import os
import shutil
import time

import pytest

import comfy_host
from parallel_backend.testing.synthetic import write_tiny_wan

pytestmark = [pytest.mark.e2e, pytest.mark.multirank]
MODEL = "tiny_wan_browser.safetensors"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EXPECTED_WIDGETS = {
    "ParallelConfig": {"world_size", "cfg", "ulysses", "ring", "tp", "dp", "dtype", "device", "attention"},
    "ParallelModelLoader": {"model_name", "base_precision"},
    "ParallelSampler": {"seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"},
}


def _artifacts_dir(tmp_path):
    d = os.environ.get("PDIT_ARTIFACTS") or os.path.join(comfy_host.REPO, "artifacts")
    os.makedirs(d, exist_ok=True)
    return d


def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is needed for the browser test: scripts/setup.sh installs it (apt-get install chromium)"
    return path


def _graph_nodes(page):
    return page.evaluate("""() => (window.app.graph._nodes || window.app.graph.nodes).map(n => ({
        type: n.type, widgets: (n.widgets || []).map(w => w.name)}))""")


def test_ui_workflow_in_real_frontend(tmp_path):
    import build_workflows as bw  # workflows/ is on sys.path via conftest
    from playwright.sync_api import sync_playwright

    ckpt = write_tiny_wan(str(tmp_path / MODEL), seed=6)
    base = comfy_host.make_base_dir(str(tmp_path / "comfy"), {"diffusion_models": [ckpt]})
    settings = os.path.join(base, "user", "default")
    os.makedirs(settings, exist_ok=True)
    with open(os.path.join(settings, "comfy.settings.json"), "w") as f:
        json.dump({"Comfy.TutorialCompleted": True}, f)  # no templates dialog on first load
    shipped_ui = comfy_host.load_workflow("wan21_t2v_parallel.json")
    cpu_api = comfy_host.tiny_cpu_variant(comfy_host.load_workflow("wan21_t2v_parallel_api.json"), MODEL,
                                          prefix="latents/browser")
    cpu_ui = bw.to_ui(bw.spec_from_api(cpu_api, "CPU smoke variant"))
    shots = _artifacts_dir(tmp_path)

    with comfy_host.ComfyServer(base) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            console = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.goto(server.url, timeout=120_000)
            page.wait_for_function("() => window.app && window.app.graph", timeout=120_000)
            page.keyboard.press("Escape")  # close any first-run dialog that still opens

            page.evaluate("wf => window.app.loadGraphData(wf)", shipped_ui)
            page.wait_for_timeout(1000)
            nodes = _graph_nodes(page)
            found = {n["type"]: set(n["widgets"]) for n in nodes}
            for node_type, widgets in EXPECTED_WIDGETS.items():
                assert node_type in found, f"{node_type} not in the loaded graph: {sorted(found)}"
                assert widgets <= found[node_type], f"{node_type} widgets {found[node_type]}"
            page.screenshot(path=os.path.join(shots, "browser_shipped_workflow.png"))

            page.evaluate("wf => window.app.loadGraphData(wf)", cpu_ui)
            page.wait_for_timeout(500)
            before = set(server.get("/history"))
            page.evaluate("() => window.app.queuePrompt(0, 1)")
            deadline = time.monotonic() + 300
            new, seen_queued = set(), False
            while time.monotonic() < deadline and not new:
                new = set(server.get("/history", timeout=30)) - before
                q = server.get("/queue", timeout=30)
                seen_queued |= bool(q["queue_running"] or q["queue_pending"])
                if not new and not seen_queued and time.monotonic() > deadline - 270:
                    page.screenshot(path=os.path.join(shots, "browser_queue_refused.png"))
                    raise AssertionError("the frontend did not queue the prompt; browser console:\n"
                                         + "\n".join(console[-30:]))
                time.sleep(1)
            assert new, f"the browser's prompt did not finish:\n{server.log_tail()}"
            hist = server.wait(new.pop(), timeout=60)
            assert hist["status"]["status_str"] == "success", hist["status"]
            page.wait_for_timeout(500)
            page.screenshot(path=os.path.join(shots, "browser_cpu_run_finished.png"))
        finally:
            browser.close()
    latent, _ = comfy_host.saved_latent(base, "latents/browser")
    assert latent.shape == (1, 16, 2, 8, 8) and latent.abs().mean() > 0.1
