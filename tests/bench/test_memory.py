"""bench/memory.py: the analytic per-rank bytes (tp / sharded weights / GGUF / fp8) against the real shapes, and a
quick CPU run of the script on the tiny preset whose measured rows must equal that analytic rule."""
import math
import os
import subprocess
import sys

import pytest

import comfy_host
from bench import memory as mem
from bench._common import WEIGHT_FORMATS, wan_file_header
from parallel_backend.testing.synthetic import WAN_PRESETS, wan_shapes
from parallel_backend.weights.gguf import quantized_bytes

P14 = "wan2.1-14b"
GIB = 2**30


def _numel(pred) -> int:
    return sum(math.prod(s) for k, s in wan_shapes(**WAN_PRESETS[P14]).items() if pred(k))


def test_analytic_bf16_tp_and_sharded_split():
    h = wan_file_header(P14, "bf16")
    blocks = 2 * _numel(lambda k: k.startswith("blocks."))
    rest = 2 * _numel(lambda k: not k.startswith("blocks.")) + 2 * _numel(lambda k: k.startswith("patch_embedding."))
    one = mem.analytic_rank(h, "tp1")
    assert one["blocks"] == blocks and one["held"] == blocks + rest  # the patch embedding is held in fp32
    assert one["block_full"] == blocks / 40
    for n in (2, 4, 8):
        sh = mem.analytic_rank(h, f"shard{n}")
        # FSDP rows: ceil(rows / n); only the (1, 6, dim) modulation does not split (rank 0 holds it whole)
        assert blocks / n <= sh["blocks"] <= blocks / n * 1.001, n
        assert sh["held"] - sh["blocks"] == rest and sh["block_full"] == one["block_full"]
    for n in (2, 4):
        tp = mem.analytic_rank(h, f"tp{n}")
        assert blocks / n < tp["blocks"] < blocks / n * 1.002, n  # row-parallel biases, norm3, modulation whole
        assert tp["held"] - tp["blocks"] == rest and not tp["dequantized"]


def test_analytic_gguf_and_fp8():
    q8 = mem.analytic_rank(wan_file_header(P14, "Q8_0"), "tp1")
    linears = [s for k, s in wan_shapes(**WAN_PRESETS[P14]).items()
               if k.startswith("blocks.") and k.endswith(".weight") and len(s) == 2]
    quant = sum(quantized_bytes(s, "Q8_0") for s in linears)
    assert quant == sum(math.prod(s) for s in linears) * 34 // 32
    assert q8["blocks"] == quant + 2 * (_numel(lambda k: k.startswith("blocks.")) - sum(math.prod(s) for s in linears))
    held = {f: mem.analytic_rank(wan_file_header(P14, f), "tp1")["blocks"] for f in WEIGHT_FORMATS}
    assert held["bf16"] > held["Q8_0"] > held["fp8"] > held["Q6_K"] > held["Q5_K"] > held["Q4_K"]
    assert held["fp8"] == held["bf16"] // 2  # an fp8 model holds every block tensor in fp8
    # a row-parallel split off a 256-block boundary (ffn.2: 13824 / 4 = 3456) is dequantized at load; 32-blocks fit
    for fmt, mode, n in (("Q4_K", "tp4", 40), ("Q5_K", "tp4", 40), ("Q4_K", "tp2", 0), ("Q8_0", "tp4", 0),
                         ("Q4_K", "shard4", 0)):
        deq = mem.analytic_rank(wan_file_header(P14, fmt), mode)["dequantized"]
        assert len(deq) == n and all(k.endswith("ffn.2.weight") for k in deq), (fmt, mode)


def test_transient_and_what_fits():
    assert mem.resident_blocks(1, gloo=True) == 2
    assert mem.resident_blocks(40, gloo=False) == 3 and mem.resident_blocks(40, gloo=True) == 4
    h = wan_file_header(P14, "bf16")
    sh = mem.analytic_rank(h, "shard2")
    assert mem.transient(sh, "shard2", "bf16", 3) == 3 * sh["block_full"]  # no cast in bf16
    assert mem.transient(mem.analytic_rank(h, "tp2"), "tp2", "bf16", 0) == 0
    q4 = mem.analytic_rank(wan_file_header(P14, "Q4_K"), "shard2")
    assert mem.transient(q4, "shard2", "Q4_K", 3) == 3 * q4["block_full"] + mem.CAST_BYTES["Q4_K"] * 13824 * 5120
    fp8 = mem.analytic_rank(wan_file_header(P14, "fp8"), "tp4")  # time_projection (30720 x 5120) is the largest cast
    assert mem.transient(fp8, "tp4", "fp8", 0) == 2 * 30720 * 5120
    # bf16 Wan 14B: 26.6 GiB whole (an 80 GB card), about half under tp2 or sharded x2 (16 GB cards)
    assert 24 * GIB < mem.analytic_rank(h, "tp1")["held"] < 80 * GIB
    assert sh["held"] + mem.transient(sh, "shard2", "bf16", 3) < 16 * GIB
    assert mem.analytic_rank(wan_file_header(P14, "Q4_K"), "tp1")["held"] < 16 * GIB


def _table(out: str, title: str) -> list:
    """The rows of the printed table that follows the line starting with `title`, as dicts (cells cut at the
    dashes line's column spans, so empty cells read as '')."""
    lines = out.splitlines()
    i = next(j for j, line in enumerate(lines) if line.startswith(title))
    head = next(j for j in range(i + 1, len(lines)) if set(lines[j + 1].replace(" ", "")) == {"-"})
    spans, pos = [], 0
    for dashes in lines[head + 1].split("  "):
        if dashes:
            spans.append((pos, pos + len(dashes)))
        pos += len(dashes) + 2
    cut = lambda line: [line[a:b + 2].strip() for a, b in spans]  # noqa: E731
    names = cut(lines[head])
    rows = []
    width = len(lines[head + 1])
    for line in lines[head + 2:]:  # a row leaves the 2-space gaps between the columns blank; the notes after do not
        if not line.strip() or len(line) > width or any(line[b:b + 2].strip() for _, b in spans[:-1]):
            break
        rows.append(dict(zip(names, cut(line.ljust(spans[-1][1])))))
    return rows


@pytest.mark.multirank
def test_tiny_run_prints_the_sharded_and_gguf_rows():
    """The script on the tiny preset, tp2 + sharded x2, bf16 and Q8_0 (2 spawns of 2 ranks): every rank holds what
    the analytic rule says (to the byte, within rounding), the forward's gathers equal gathered_bytes(), and the
    analytic tables are printed."""
    env = {**os.environ, "COMFYUI_PATH": comfy_host.comfyui_path()}
    r = subprocess.run([sys.executable, "bench/memory.py", "--preset", "tiny", "--blocks", "1", "--modes",
                        "tp2,shard2", "--gguf", "Q8_0", "--device", "cpu"], cwd=comfy_host.REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    at_load = _table(out, "[1] At load")
    assert {(row["weights"], row["mode"]) for row in at_load} == {(f, m) for f in ("bf16", "Q8_0")
                                                                  for m in ("tp2", "shard2")}
    assert len(at_load) == 8  # 2 ranks each
    for row in at_load:  # the 2nd file of a spawn has no ru_maxrss figures of its own
        assert (row["peak RSS"] == "-") == (row["weights"] == "Q8_0"), row
        assert float(row["VmHWM delta"]) > 0
    fwd = {(row["weights"], row["mode"]): row for row in _table(out, "[2b]")}
    for f in ("bf16", "Q8_0"):
        assert float(fwd[f, "shard2"]["gathered"]) > 0
        assert fwd[f, "shard2"]["gathered"] == fwd[f, "shard2"]["gather formula"]
        assert float(fwd[f, "tp2"]["gathered"]) == 0
        assert fwd[f, "shard2"]["finite"] == fwd[f, "tp2"]["finite"] == "yes"
    assert fwd["Q8_0", "shard2"]["gguf kept / deq."] == "10 / 0"  # 10 block linears stay quantized
    proj = _table(out, "[3] Projection")
    assert len(proj) == 4
    for row in proj:
        assert abs(float(row["file vs an (1 blk)"].rstrip("%"))) < 0.05, row
    analytic = {row["weights"]: row for row in _table(out, "[4] ANALYTIC")}
    assert set(analytic) == set(WEIGHT_FORMATS)
    assert list(analytic["bf16"])[2:] == ["tp1", "tp2", "tp4", "shard2", "shard4", "shard8"]
    fits = _table(out, "[5] ANALYTIC")
    assert all(cell.endswith("[16]") for row in fits for k, cell in row.items() if k != "weights")  # tiny fits
    assert {row["weights"] for row in _table(out, "[5b]")} == set(WEIGHT_FORMATS)


@pytest.mark.multirank
def test_kandinsky5_run_prints_per_rank_rows():
    """--family kandinsky5 on the tiny preset (2 visual blocks), tp1 and sharded x2: the rows of both ranks, each
    sharded rank holding about half of every text and visual block (rows split by FSDP, the rest whole), a finite
    forward, and the projection to the real block count."""
    if comfy_host.comfyui_version() == "0.3.75":
        pytest.skip("this ComfyUI has no Kandinsky 5 class")
    env = {**os.environ, "COMFYUI_PATH": comfy_host.comfyui_path()}
    r = subprocess.run([sys.executable, "bench/memory.py", "--family", "kandinsky5", "--preset", "tiny", "--blocks",
                        "2", "--modes", "tp1,shard2", "--device", "cpu"], cwd=comfy_host.REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {(row["mode"], row["rank"]): row for row in _table(r.stdout, "[1k] At load")}
    assert set(rows) == {("tp1", "0"), ("shard2", "0"), ("shard2", "1")}
    whole = float(rows["tp1", "0"]["params MiB"])
    assert rows["tp1", "0"]["of full"] == "1.000"
    for rank in "01":
        held = float(rows["shard2", rank]["params MiB"])
        assert 0.5 * whole < held < 0.75 * whole, (held, whole)  # the embeddings and out layer stay whole
        assert rows["shard2", rank]["finite"] == "yes"
    assert [row["mode"] for row in _table(r.stdout, "[2k] Projection")] == ["tp1", "shard2"]


# the released sizes (billions of parameters) each family's largest preset must count, from its shapes alone
RELEASED_B = {("ltxv", "ltxv-13b"): 13, ("ltxav", "ltx-2-19b"): 19, ("hunyuan_video", "hunyuan-video-1.5"): 8.3,
              ("hunyuan_video", "hunyuan-video-1.0"): 13, ("cosmos", "cosmos-predict2-14b-t2i"): 14,
              ("cosmos1", "cosmos-1.0-14b-t2w"): 14, ("kandinsky5", "kandinsky5-pro-video"): 19}


def test_every_family_counts_its_released_size_and_cuts_its_blocks():
    """From the shapes alone (no spawn): each large preset's parameter count is the release's, and a 1-block file
    holds one block of each block list (HunyuanVideo 1.0: a double and a single block) at the real widths."""
    for (family, preset), billions in RELEASED_B.items():
        assert abs(mem.whole_bytes(family, preset) / 2 / 1e9 - billions) < 0.1 * billions, (family, preset)
    for family, spec in mem.FAMILIES.items():
        assert spec.default in spec.presets and "tiny" in spec.presets
        real, cfg = mem.family_config(family, spec.default, 1)
        assert all(cfg[k] == min(1, real[k]) for k, _ in spec.blocks)
        assert mem.whole_bytes(family, spec.default, 1) < mem.whole_bytes(family, spec.default) / 5, family


def _family_available(family: str) -> bool:
    """Whether this ComfyUI has the family's class (0.3.75 lacks MiniMax H3, LTX-2 and Kandinsky 5)."""
    lightricks = os.path.join(comfy_host.comfyui_path(), "comfy", "ldm", "lightricks", "av_model.py")
    return {"ltxav": os.path.isfile(lightricks)}.get(family, family not in ("minimax", "kandinsky5")
                                                        or comfy_host.comfyui_version() != "0.3.75")


@pytest.mark.multirank
@pytest.mark.parametrize("family", ["ltxv", "hunyuan_video", "minimax"])
def test_family_run_prints_halved_blocks_on_tp2_and_sharded_x2(family):
    """--family on the tiny preset, 1 block of each block list, tp2 and sharded x2 (2 spawns of 2 ranks): both
    ranks' rows; one block on each rank about half of the whole block as its shapes count it (sharded x2: FSDP's
    rows, tp2: the TP plan, norms and modulation whole); the projection below the whole model and above its
    1 / 2 share; a finite forward, or none with the reason said (MiniMax H3's [video, audio] latents)."""
    if not _family_available(family):
        pytest.skip(f"this ComfyUI has no {family} class")
    env = {**os.environ, "COMFYUI_PATH": comfy_host.comfyui_path()}
    r = subprocess.run([sys.executable, "bench/memory.py", "--family", family, "--preset", "tiny", "--blocks", "1",
                        "--modes", "tp2,shard2", "--device", "cpu"], cwd=comfy_host.REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {(row["mode"], row["rank"]): row for row in _table(r.stdout, "[1k] At load")}
    assert set(rows) == {(m, k) for m in ("tp2", "shard2") for k in "01"}
    forward = mem.FAMILIES[family].forward is not None
    assert all(row["finite"] == ("yes" if forward else "-") for row in rows.values()), rows
    assert forward or f"no tiny forward for {family}" in r.stdout
    block = (mem.whole_bytes(family, "tiny", 1) - mem.whole_bytes(family, "tiny", 0)) / 2**20  # one of each list
    proj = {row["mode"]: row for row in _table(r.stdout, "[2k] Projection")}
    for mode, (lo, hi) in (("shard2", (0.45, 0.58)), ("tp2", (0.45, 0.75))):
        held = sum(float(b) for b in proj[mode]["per block MiB"].split(" / "))
        assert lo * block < held < hi * block, (mode, held, block)
        assert 0.5 < float(proj[mode]["of whole"]) < 1.0, proj[mode]
