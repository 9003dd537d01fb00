"""bench/comm_volume.py --families: the bytes each family's attention layout sends, counted on 2 real gloo ranks
(tiny files), against what the layout implies and beside Wan's formula at the same width, video tokens and blocks.

LTX-Video's layout is Wan's (video split, text a whole cross-attention input): its bytes are the formula's exactly.
HunyuanVideo keeps its text whole on every rank inside the joint attention, so each all-to-all / ring pass carries
the text too: more than Wan's formula at the same image tokens, growing with the text. MiniMax H3 (ComfyUI 0.33
only) splits one packed sequence [text | audio | video]: Wan's formula at the packed length. LTX-2 (0.33 only) splits
both streams and gathers the other stream's keys / values whole for its audio <-> video cross-attentions.
"""
import pytest

import comfy_host
from bench import comm_volume as cv

pytestmark = pytest.mark.multirank
NEWER = comfy_host.comfyui_version() != "0.3.75"  # MiniMax H3 and LTX-2 are ComfyUI 0.33's classes (0.3.75 refuses)
NAMES = ["ltxv", "hunyuan_video"] + (["minimax", "ltxav"] if NEWER else [])
E = 2  # bf16 bytes
BYT5 = 4  # the bench's HunyuanVideo inputs: 4 ByT5 tokens join the text
MINIMAX_AUDIO = 14  # ... and MiniMax's audio latent packs 14 rows


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One 2-rank spawn: each family's tiny file under ulysses2, ring2 and tp2 at the bench's three points."""
    return cv.measure_families(cv.family_jobs(str(tmp_path_factory.mktemp("comm_fam")), NAMES))


def _points(name):
    for grid, extra in cv.family_points(cv.FAMILIES[name]):
        yield grid, extra, cv.family_split_tokens(name, grid)


def _blocks(rec):
    return sum(rec["units"].values())


def test_every_forward_ran_on_both_ranks_with_equal_bytes(measured):
    """measure_families raises where the two ranks' counters differ; every axis of every family ran and was finite."""
    assert len(measured) == len(NAMES) * 3 * 3
    for key, rec in measured.items():
        assert rec["finite"] is not False, key
        assert _blocks(rec) > 0, key


def test_ltxv_layout_is_wans_formula_exactly(measured):
    for axis in cv.FAMILY_AXES:
        for grid, extra, _ in _points("ltxv"):
            rec = measured[(f"ltxv/{axis}2", grid, extra)]
            assert _blocks(rec) == cv.wan_blocks("ltxv", axis, grid, extra), (axis, grid, extra, rec)


def test_hunyuan_video_joint_text_rides_every_exchange(measured):
    """Per double and per single block, n = 2: Ulysses 4 all-to-alls of the local (text + S/2, D) tensor, each half
    of it leaving; Ring one pass of K and V of that length; TP 2 all-reduces of (S + text, D) in a double block (its
    attention and MLP outputs, both streams), 1 in a single block (2 (n-1)/n x bytes = the bytes at n = 2), plus
    the modulations' one row (6 x D per stream of a double block, 3 x D in a single block: split by input)."""
    p = cv.family_preset("hunyuan_video")
    D, blocks = p["hidden"], p["depth"] + p["single"]
    for grid, extra, S in _points("hunyuan_video"):
        T = extra + BYT5
        rec = {a: measured[(f"hunyuan_video/{a}2", grid, extra)] for a in cv.FAMILY_AXES}
        assert _blocks(rec["ulysses"]) == blocks * 4 * (T + S // 2) * D * E // 2
        assert _blocks(rec["ring"]) == blocks * 2 * (T + S // 2) * D * E
        assert rec["tp"]["units"] == {"double_blocks": p["depth"] * 2 * (S + T + 6) * D * E,
                                      "single_blocks": p["single"] * (S + T + 3) * D * E}
        for axis in ("ulysses", "ring"):  # more than Wan at the same image tokens: the text is the difference
            assert _blocks(rec[axis]) > cv.wan_blocks("hunyuan_video", axis, grid, extra)
    # per text token it grows where Wan's formula does not; per image token it grows as Wan's
    for axis in ("ulysses", "ring"):
        recs = cv.family_records(measured, "hunyuan_video", axis)
        _, per_s, per_e = cv._affine("hunyuan_video", [_blocks(r) for r in recs])
        wan = cv._affine("hunyuan_video", [cv.wan_blocks("hunyuan_video", axis, g, e) for g, e, _ in
                                           _points("hunyuan_video")])
        assert per_s == wan[1] and per_e > 0 and wan[2] == 0, (axis, per_s, per_e, wan)


@pytest.mark.skipif(not NEWER, reason="this ComfyUI has no MiniMax H3 class")
def test_minimax_packed_sequence_is_wans_formula_at_the_packed_length(measured):
    p = cv.family_preset("minimax")
    D, L = p["hidden"], p["num_layers"]
    for grid, extra, S in _points("minimax"):
        P = S + extra  # extra = text + the 14 audio rows: the whole packed sequence, split evenly
        rec = {a: measured[(f"minimax/{a}2", grid, extra)] for a in cv.FAMILY_AXES}
        wan_packed = L * cv.analytic("ulysses", 2, cv.Shape(D, 6, 0, L, P))["per_block"]["all_to_all"]
        assert _blocks(rec["ulysses"]) == _blocks(rec["ring"]) == wan_packed
        assert _blocks(rec["ulysses"]) > cv.wan_blocks("minimax", "ulysses", grid, extra)  # text + audio ride along
        # attention out + fc2 (no cross-attention), and the AdaLN's 2 timestep rows of 18 x D (split by input)
        assert _blocks(rec["tp"]) == L * 2 * (P + 18) * D * E
        assert extra > MINIMAX_AUDIO  # the text is in the packed length too


@pytest.mark.skipif(not NEWER, reason="this ComfyUI has no LTX-2 (LTXAV) class")
def test_ltx2_second_stream_and_its_key_value_gathers(measured):
    """Per block, n = 2: each stream's self-attention exchanges its own half (video S / 2 tokens of width D, audio
    A / 2 of width Da), and the two cross-attentions gather the other stream's local K and V projected to the audio
    width: audio -> video attention the audio's, video -> audio attention the video's (all-gather: (n-1) x local)."""
    p = cv.family_preset("ltxav")
    D, Da, L = p["width"], p["audio_width"], p["num_layers"]
    for grid, A, S in _points("ltxav"):
        rec = {a: measured[(f"ltxav/{a}2", grid, A)] for a in cv.FAMILY_AXES}
        gathers = 2 * (A // 2) * Da * E + 2 * (S // 2) * Da * E
        assert _blocks(rec["ulysses"]) == L * (4 * (S // 2) * D * E // 2 + 4 * (A // 2) * Da * E // 2 + gathers)
        assert _blocks(rec["ring"]) == L * (2 * (S // 2) * D * E + 2 * (A // 2) * Da * E + gathers)
        assert rec["ulysses"]["total"]["all_to_all"] == L * (4 * (S // 2) * D * E // 2 + 4 * (A // 2) * Da * E // 2)
        assert _blocks(rec["ulysses"]) > cv.wan_blocks("ltxav", "ulysses", grid, A)


def test_projection_to_real_size(measured):
    """[F2]: LTXV at LTXV 13B's size projects onto Wan's formula there; HunyuanVideo 1.5's whole text adds a little
    at 111,600 image tokens; its TP moves 2/3 of Wan's (4 all-reductions of a block's width per token, Wan 6)."""
    real = cv.FAMILIES["ltxv"].reals[0]
    recs = cv.family_records(measured, "ltxv", "ulysses")
    assert cv.family_blocks_real("ltxv", recs, "ulysses", real) == pytest.approx(
        cv.wan_blocks("ltxv", "ulysses", real[1], real[2], real[0]), rel=1e-9)
    real = cv.FAMILIES["hunyuan_video"].reals[0]
    for axis, lo, hi in (("ulysses", 1.0, 1.01), ("tp", 0.66, 0.67)):
        proj = cv.family_blocks_real("hunyuan_video", cv.family_records(measured, "hunyuan_video", axis), axis, real)
        wan = cv.wan_blocks("hunyuan_video", axis, real[1], real[2], real[0])
        assert lo < proj / wan < hi, (axis, proj, wan)


def test_families_mode_prints_both_tables(capsys):
    assert cv.main(["--families", "ltxv", "--family-axes", "ulysses"]) == 0
    out = capsys.readouterr().out
    assert "[F1] MEASURED" in out and "[F2] PROJECTED" in out and "ltxv-13b" in out
