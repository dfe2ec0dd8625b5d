"""Leaderboard and recommender on a store with known rows: frontier, quality per size, the memory estimate,
the choice and its runner-up, and "nothing fits" with what would."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tinytitan.report.html import write_html
from tinytitan.report.leaderboard import build, frontier, markdown
from tinytitan.report.recommend import memory_needed, recommend
from tinytitan.store import JobIdentity, Metric, Store, canonical_json

MB = 1e6
# name -> (file MB, KLD, top-1 %, decode tok/s, peak RSS MB at 512, KV bytes per position (full layers))
VARIANTS = {
    "base": (250.0, None, None, 10.0, 1200.0, 20_000),
    "w8": (300.0, 0.004, 96.0, 40.0, 700.0, 20_000),
    "w4g32": (170.0, 0.09, 84.0, 55.0, 420.0, 20_000),
    "w4g32-kv8": (170.0, 0.10, 83.0, 50.0, 410.0, 5_000),
    "w2g64": (90.0, 1.5, 45.0, 60.0, 300.0, 20_000),
    "worse": (200.0, 0.5, 60.0, 20.0, 500.0, 20_000),  # dominated: bigger and worse than w4g32
}
SCRATCH = 8192.0  # attention scratch bytes per position


def _fill(path: Path) -> None:
    with Store(path) as st:
        for name, (size, kld, top1, dec, rss, kv_per) in VARIANTS.items():
            variant = "" if name == "base" else canonical_json({"name": name})
            speed = [
                Metric("file_bytes", size * MB, None, 1),
                Metric("bits_per_weight", 8 * size * MB / 268e6, None, 1),
                Metric("peak_rss_bytes", rss * MB, None, 1),
                Metric("decode_tok_s@ctx=512", dec, None, 32),
                Metric("attn_scratch_bytes_per_position", SCRATCH, None, 1),
                *[Metric(f"kv_bytes@ctx={n}", kv_per * n, None, 1) for n in (512, 1024, 2048, 4096, 32768)],
            ]
            jobs = {"speed": speed}
            if kld is not None:
                jobs["kld"] = [
                    Metric("kld_mean", kld, kld / 50, 2048),
                    Metric("same_top_p", top1, 0.5, 2048),
                    Metric("ppl", 15.0 * math.exp(kld), 0.1, 2048),
                ]
            else:
                jobs["kld"] = [Metric("kld_mean", 0.0, 0.0, 2048), Metric("same_top_p", 100.0, 0.0, 2048)]
            for task, metrics in jobs.items():
                ident = JobIdentity("m", "sha", variant, task, "1", {})
                st.start_job(ident)
                st.finish_job(ident, metrics, "test", "machine")


@pytest.fixture
def board(tmp_path):
    _fill(tmp_path / "r.sqlite")
    return build(tmp_path / "r.sqlite", "m")


def test_frontier_of_known_points() -> None:
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 3.0), (2.5, 4.0), (4.0, 1.0), (1.0, 6.0)]
    assert frontier(pts) == [0, 1, 4]
    assert frontier([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # equal points do not dominate each other


def test_board_scores_and_frontier(board) -> None:
    by = {e.label: e for e in board.entries}
    assert set(by) == set(VARIANTS)
    assert board.entries[0].label == "base" and board.entries[0].is_reference
    assert by["base"].qps == pytest.approx(1.0)
    assert by["w4g32"].qps == pytest.approx(math.exp(-0.09) * 250 / 170)
    assert by["w2g64"].qps == pytest.approx(math.exp(-1.5) * 250 / 90)
    # size frontier: base (KLD 0), w4g32, w2g64; w8 is bigger than base, "worse" is dominated by w4g32,
    # the KV variant is as big as w4g32 and worse
    assert {e.label for e in board.entries if e.on_size_frontier} == {"base", "w4g32", "w2g64"}
    assert {e.label for e in board.entries if e.on_speed_frontier} == {"base", "w8", "w4g32", "w2g64"}
    qps = [e.qps for e in board.entries[1:]]
    assert qps == sorted(qps, reverse=True)  # ranked by quality for size after the reference
    md = markdown(board)
    assert "| w4g32 | 170.0 |" in md and "quality per size = exp(-mean KLD)" in md


def test_memory_estimate_follows_the_recorded_kv_sizes(board) -> None:
    e = next(x for x in board.entries if x.label == "w4g32")
    assert memory_needed(e, 512) == pytest.approx(420 * MB)
    grow = 20_000 * (4096 - 512) + SCRATCH * (4096 - 512)
    assert memory_needed(e, 4096) == pytest.approx(420 * MB + grow)
    mid = 20_000 * (3000 - 512) + SCRATCH * (3000 - 512)  # between recorded lengths: linear
    assert memory_needed(e, 3000) == pytest.approx(420 * MB + mid)


def test_recommend_picks_the_best_that_fits(board) -> None:
    r = recommend(board, 900 * MB, context=4096)
    assert r.best.entry.label == "w8" and r.runner_up.entry.label == "w4g32"
    assert recommend(board, 800 * MB, context=4096).best.entry.label == "w4g32"  # w8 needs 801 MB
    r = recommend(board, 500 * MB, context=2048)  # base (1.2 GB) and w8 (0.7 GB) do not fit
    assert r.best.entry.label == "w4g32" and r.runner_up.entry.label == "w4g32-kv8"
    why = {n.entry.label: n.why_not for n in r.rejected}
    assert "needs" in why["w8"][0]
    r = recommend(board, 900 * MB, context=4096, min_decode_tps=45)
    assert r.best.entry.label == "w4g32"
    assert any("decodes 40.0 tok/s" in w for w in {n.entry.label: n.why_not for n in r.rejected}["w8"])
    r = recommend(board, 1400 * MB, context=4096, min_top1=0.9)  # a fraction or a percentage
    assert r.best.entry.label == "base" and r.runner_up.entry.label == "w8"
    assert recommend(board, 1400 * MB, context=4096, min_top1=85).runner_up.entry.label == "w8"
    # at 32K, only the variant with the int8 KV cache fits in 900 MB (835 MB; w2g64 needs 1209 MB)
    r = recommend(board, 900 * MB, context=32768)
    assert r.best.entry.label == "w4g32-kv8"


def test_recommend_says_what_would_fit_when_nothing_does(board) -> None:
    r = recommend(board, 310 * MB, context=4096)
    assert r.best is None and r.runner_up is None
    text = " ".join(r.advice)
    assert "w2g64 fits with a context of up to" in text
    n = int(text.split("up to ")[1].split()[0])
    e = next(x for x in board.entries if x.label == "w2g64")
    assert memory_needed(e, n) <= 310 * MB < memory_needed(e, n + 1)
    r = recommend(board, 100 * MB, context=4096)
    assert r.best is None and "needs" in " ".join(r.advice)


def test_html_page_is_self_contained(board, tmp_path) -> None:
    out = tmp_path / "board.html"
    write_html(board, out)
    page = out.read_text()
    assert 'id="leaderboard"' in page and 'id="provenance"' in page and "pareto-size" in page
    assert "<script src=" not in page  # plotly is embedded: the page works offline
    assert "exp(-mean KLD)" in page


def test_cli_leaderboard_and_recommend(tmp_path, capsys) -> None:
    from tinytitan.cli.main import main

    store = tmp_path / "r.sqlite"
    _fill(store)
    assert main(["leaderboard", "--store", str(store), "--md", str(tmp_path / "b.md")]) == 0
    assert (tmp_path / "b.md").read_text().startswith("# Leaderboard: m")
    assert main(["recommend", "--store", str(store), "--ram", "500MB", "--context", "2048"]) == 0
    out = capsys.readouterr().out
    assert "recommended for 500 MB at 2048 tokens: w4g32" in out and "runner-up: w4g32-kv8" in out
    assert main(["recommend", "--store", str(store), "--ram", "100MB"]) == 1
    assert "nothing measured for m fits" in capsys.readouterr().out
    assert main(["recommend", "--store", str(tmp_path / "none.sqlite"), "--ram", "1GB"]) == 2
    assert main(["recommend", "--store", str(store), "--ram", "lots"]) == 2


def test_a_rebuilt_variant_replaces_its_older_build(tmp_path) -> None:
    """Two builds under one name (a plan: after the planner changed): the newer one is the row shown."""
    import time

    path = tmp_path / "r.sqlite"
    with Store(path) as st:
        for build_no, kld in ((1, 0.12), (2, 0.03)):
            variant = canonical_json({"name": "plan:150MB", "build": build_no})
            ident = JobIdentity("m", "sha", variant, "kld", "1", {})
            st.start_job(ident)
            st.finish_job(ident, [Metric("kld_mean", kld, 0.001, 100)], "test", "machine")
            time.sleep(1.1)  # row times have one-second resolution
    entries = [e for e in build(path, "m").entries if e.label == "plan:150MB"]
    assert len(entries) == 1 and entries[0].kld == pytest.approx(0.03)


def _speed_only(path: Path, reason: str) -> None:
    """Two variants measured for speed; their KLD jobs could not run (no data), for the reference too."""
    with Store(path) as st:
        for name, size in (("base", 250.0), ("w4g32", 170.0)):
            variant = "" if name == "base" else canonical_json({"name": name})
            ident = JobIdentity("m", "sha", variant, "speed", "1", {})
            st.start_job(ident)
            st.finish_job(
                ident,
                [Metric("file_bytes", size * MB, None, 1), Metric("decode_tok_s@ctx=512", 30.0, None, 32)],
                "test",
                "machine",
            )
            st.note_skip("m", "sha", variant, "kld", reason)


def test_no_kld_rows_means_blank_cells_with_the_reason(tmp_path, capsys) -> None:
    from tinytitan.report.leaderboard import columns, print_table

    reason = "kld: no data found (looked for the embedded pack); pass --data DIR"
    _speed_only(tmp_path / "r.sqlite", reason)
    board = build(tmp_path / "r.sqlite", "m")
    ref = board.reference
    assert ref is not None and ref.kld is None and ref.top1 is None and ref.qps is None
    assert not any(e.on_size_frontier or e.on_speed_frontier for e in board.entries)  # nothing measured
    cells = {e.label: {h: fn(e) for h, fn in columns(board)} for e in board.entries}
    for label in ("base", "w4g32"):
        assert cells[label]["KLD"] == cells[label]["top-1 %"] == cells[label]["quality/size"] == "[1]"
        assert cells[label]["size MB"] != ""
    md = markdown(board)
    assert f"[1] kld skipped: {reason}" in md and "0.0000" not in md and "100.0" not in md
    write_html(board, tmp_path / "b.html")
    assert f"kld skipped: {reason}" in (tmp_path / "b.html").read_text()
    print_table(board)
    assert "kld skipped: kld: no data found" in capsys.readouterr().out


def test_a_later_result_clears_the_skip(tmp_path) -> None:
    path = tmp_path / "r.sqlite"
    _speed_only(path, "no data")
    with Store(path) as st:
        ident = JobIdentity("m", "sha", "", "kld", "1", {})
        st.start_job(ident)
        st.finish_job(
            ident, [Metric("kld_mean", 0.0, 0.0, 100), Metric("same_top_p", 100.0, 0.0, 100)], "t", "m"
        )
        assert [k.task for k in st.skips("m")] == ["kld"]  # only the variant's skip is left
    board = build(path, "m")
    assert board.reference.kld == 0.0 and "kld" not in board.reference.missing


def _mc_job(st: Store, variant: str, correct: list[int], options: dict) -> None:
    """A finished arc_easy job whose items are answered right (gold = argmax) or wrong."""
    ident = JobIdentity("m", "sha", variant, "arc_easy", "1", options)
    st.start_job(ident)
    items = {
        str(i): {
            "ll": [-1.0, -2.0] if ok else [-2.0, -1.0],
            "greedy": [False, False],
            "gold": 0,
            "len": [3, 3],
        }
        for i, ok in enumerate(correct)
    }
    st.save_items(ident.scope, items)
    acc = sum(correct) / len(correct)
    se = math.sqrt(acc * (1 - acc) / (len(correct) - 1))
    st.finish_job(
        ident, [Metric("acc", acc, se, len(correct)), Metric("acc_norm", acc, se, len(correct))], "t", "m"
    )


def test_task_cells_are_marked_where_the_difference_is_noise(tmp_path) -> None:
    from tinytitan.report.leaderboard import NOISE, columns

    path = tmp_path / "r.sqlite"
    opts = {"limit": 100, "num_fewshot": 0, "seed": 1234, "data": "abc", "data_source": "pack 1"}
    ref = [1] * 60 + [0] * 40
    with Store(path) as st:
        _mc_job(st, "", ref, opts)
        _mc_job(st, canonical_json({"name": "same"}), list(ref), opts)
        _mc_job(st, canonical_json({"name": "worse"}), [0] * 30 + ref[30:], opts)  # wrong on 30 more
        _mc_job(st, canonical_json({"name": "other-data"}), list(ref), {**opts, "data": "def"})
    board = build(path, "m")
    by = {e.label: e for e in board.entries}
    cell = dict(columns(board))["arc_easy"]
    assert cell(by["same"]).endswith(NOISE) and not by["same"].paired["arc_easy/acc_norm"].distinguishable
    assert not cell(by["worse"]).endswith(NOISE) and by["worse"].paired["arc_easy/acc_norm"].hi < 0
    assert "arc_easy/acc_norm" not in by["other-data"].paired  # other items: no pairing, no mark
    assert cell(by["base"]) == "60.0 ±4.9"
    page = tmp_path / "b.html"
    write_html(board, page)
    assert 'id="paired"' in page.read_text() and "not distinguishable (noise)" in page.read_text()
