"""The terminal's progress lines and recall tables (pipeline/progress.py)."""

from __future__ import annotations

from raydistill.pipeline.progress import SteadyRate, progress_line, recall_header, recall_line

METRICS = {"i2t_r1": 56.7, "i2t_r5": 89.25, "i2t_r10": 96.0, "t2i_r1": 54.6, "t2i_r5": 97.8, "t2i_r10": 99.7,
           "rsum": 494.05, "mean_recall": 82.3}


def test_recall_rows_line_up_under_the_header() -> None:
    header = recall_header(22, "  params")
    row = recall_line("teacher", METRICS, 22, "   5.03M")
    assert header.split() == ["model", "I2T@1", "I2T@5", "I2T@10", "T2I@1", "T2I@5", "T2I@10", "RSUM", "params"]
    assert row.split() == ["teacher", "56.7", "89.2", "96.0", "54.6", "97.8", "99.7", "494.1", "5.03M"]
    # Every value ends in the column where its label ends.
    for label, value in zip(header.split()[1:], row.split()[1:]):
        assert header.index(label) + len(label) == row.index(value) + len(value)


def test_a_model_without_recall_shows_a_dash() -> None:
    assert recall_line("student", None).split() == ["student", "-"]
    assert recall_line("student", {}).split() == ["student", "-"]


def test_progress_line_states_percentage_and_eta() -> None:
    # 250 of 1,000 in 30 s: 8.3 per second, 750 left at that rate is 90 s.
    assert progress_line("teacher pass", 250, 1000, 30.0) == (
        "teacher pass: 250/1,000 (25%), 0:30 elapsed, 8.3/s, ETA 1:30")


def test_the_eta_waits_for_a_rate_measured_after_the_start_up() -> None:
    # 100 s of start-up, then the first step: done / elapsed would promise 299 more steps at 1 per 100 s.
    steady = SteadyRate()
    assert steady(0, 50.0) == 0.0 and steady(1, 100.0) == 0.0
    assert progress_line("training", 1, 300, 100.0, rate=steady(1, 100.0)) == "training: 1/300 (0%), 1:40 elapsed"
    # Two more steps in the next 4 s: 0.5 steps per second, 297 left.
    rate = steady(3, 104.0)
    assert rate == 0.5
    assert progress_line("training", 3, 300, 104.0, rate=rate) == (
        "training: 3/300 (1%), 1:44 elapsed, 0.5/s, ETA 9:54")
