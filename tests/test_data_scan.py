"""``scan``: every planted bad file is found (missing, empty, not a video, audio only, cut
before and after the index, too short), the summary counts them, the clean list leaves them out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import run_cli
from data_helpers import truncate, write_audio_only, write_coded_video
from dist_video.data import parse_csv
from dist_video.data.scan import load_for_scan, scan_dataset, summarize, write_clean_annotations

TIMEOUT = 240

PLANTED = {  # file -> expected status
    "missing.mp4": "missing",
    "empty.mp4": "unreadable",
    "text.mp4": "unreadable",
    "audio.mp4": "unreadable",
    "cut_index.mp4": "unreadable",     # moov atom at the end: the cut removed the index
    "cut_faststart.mp4": "truncated",  # index first: opens, but frames are missing
    "cut.mkv": "truncated",            # Matroska states no frame count, only a duration
    "short.mp4": "short",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scan")
    v = root / "videos"
    v.mkdir()
    good = [write_coded_video(v / f"good{i}.mp4", 40, seed=i) for i in range(3)]
    write_coded_video(v / "big.mp4", 40, width=320, height=240)
    (v / "empty.mp4").write_bytes(b"")
    (v / "text.mp4").write_text("not a video")
    write_audio_only(v / "audio.mp4.wav")
    (v / "audio.mp4.wav").rename(v / "audio.mp4")
    truncate(good[0], v / "cut_index.mp4", 0.6)
    full = write_coded_video(root / "faststart.mp4", 40, container_options={"movflags": "faststart"})
    truncate(full, v / "cut_faststart.mp4", 0.6)
    mkv = write_coded_video(root / "full.mkv", 40)
    truncate(mkv, v / "cut.mkv", 0.6)
    write_coded_video(v / "short.mp4", 5)
    names = ["good0.mp4", "good1.mp4", "good2.mp4", "big.mp4", *PLANTED]
    lines = ["path,label"] + [f"videos/{n},{'jump' if i % 2 else 'run'}" for i, n in enumerate(names)]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def test_scan_finds_every_planted_bad_file(dataset, tmp_path):
    records, missing, ann = load_for_scan(dataset / "train.csv", fmt="csv")
    assert [Path(p).name for p in missing] == ["missing.mp4"]
    results = scan_dataset(records, workers=2, min_frames=16)
    status = {Path(r.path).name: r.status for r in results}
    status.update({Path(p).name: "missing" for p in missing})
    assert {k: v for k, v in status.items() if v != "ok"} == PLANTED
    causes = {Path(r.path).name: r.cause for r in results}
    assert "empty file" in causes["empty.mp4"] and "no video stream" in causes["audio.mp4"]
    assert "declares 40 frames" in causes["cut_faststart.mp4"]
    summary = summarize(results)
    assert summary["status"] == {"ok": 4, "short": 1, "missing": 0, "unreadable": 4, "truncated": 2}
    assert summary["short_side"]["0-240 px"] == 6 and summary["short_side"]["240-320 px"] == 1
    clean, classes = write_clean_annotations(results, ann.class_names, tmp_path / "clean.csv")
    kept, names = parse_csv(clean, classes=classes)
    assert names == ann.class_names
    assert sorted(Path(r.path).name for r in kept) == ["big.mp4", "good0.mp4", "good1.mp4", "good2.mp4",
                                                       "short.mp4"]
    by_name = {Path(r.path).name: r.label for r in records}
    assert all(r.label == by_name[Path(r.path).name] for r in kept)


@pytest.mark.slow
def test_scan_command_prints_the_summary_and_writes_the_report_and_clean_list(dataset, tmp_path):
    proc = run_cli("scan", str(dataset / "train.csv"), "--format", "csv", "--report", str(tmp_path / "report.json"),
                   "--write-clean", str(tmp_path / "clean.csv"), "--no-progress", "--workers", "2", timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stderr  # bad files found
    for name, status in PLANTED.items():
        if status != "short":
            assert f"{status}: " in proc.stdout and name in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["status"]["missing"] == 1 and len(report["files"]) == 12
    assert len((tmp_path / "clean.csv").read_text().splitlines()) == 1 + 5
