"""The README's Performance tables from the result files: ``python -m benchmarks.report [tag] [--results DIR]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, table


def _load(name: str, folder: Path) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _machine(r: dict[str, Any]) -> str:
    h = r["hardware"]
    gpus = f", {len(h['gpus'])}x {h['gpus'][0]}" if h.get("gpus") else ", no GPU"
    return f"{h['cpus']} CPUs ({h['cpu']}){gpus}; torch {r['versions']['torch']}, ray {r['versions']['ray']}"


def quality_table(r: dict[str, Any]) -> str:
    """The quality result's table: the teacher, then each arm at its setting, its test mean and spread; then,
    when measured, the converged budget's rows."""
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    rows = [["teacher", None, None, None, *(round(r["teacher"][k], 1) for k in keys), None, r["teacher"]["params"]]]
    arms = [(a["arm"], a) for a in r["ablation"]]
    for name in ("distilled", "baseline"):
        if name in r.get("converged", {}):
            row = r["converged"][name]
            arms.append((f"{name} (converged)", row))
            if "at_best" in row:  # the same runs, tested at their best validation step (what a run exports)
                arms.append((f"{name} (converged, best val step)", row | row["at_best"] | {
                    "steps": " / ".join(str(s) for s in row["at_best"]["best_step_per_seed"])}))
    rows += [[name, a["steps"], _setting(a), _chosen_on(a), *(round(a[k], 1) for k in keys), f"{a['rsum_std']:.1f}",
              a["params"]] for name, a in arms]
    return table(["model", "steps", "lr / beta2 / warm-up", "chosen on", "I2T@1", "I2T@5", "I2T@10", "T2I@1",
                  "T2I@5", "T2I@10", "RSUM", "± sd", "params"], rows)


def _setting(arm: dict[str, Any]) -> str:
    return f"{arm['lr']:g} / {arm['beta2']:g} / {arm['warmup']:g}"


def _chosen_on(arm: dict[str, Any]) -> str:
    """How an arm's setting was chosen."""
    if arm["select_on"].startswith("mean"):
        return f"val, mean of {len(arm['rsum_per_seed'])} seeds"
    return arm["select_on"]


def _teacher(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    title = (f"**Teacher stage** ({c['teacher']} teacher, {c['image_size']} px, batch {c['batch_size']}, "
             f"{c['actors']} actor(s); {r['images']} images / {r['captions']} captions; {_machine(r)}):")
    sides = ("plain", "pipeline")
    if "steady_images_per_s" not in r["plain"]:  # measured before start-up and steady state were told apart
        return [title, "", table(["", "images/s", "captions/s", "seconds"],
                                 [[k, r[k]["images_per_s"], r[k]["captions_per_s"], r[k]["seconds"]] for k in sides]
                                 + [["**ratio** (pipeline / plain)", round(r["ratio"], 3), None, None]]), ""]
    rows = [[k, r[k]["steady_images_per_s"], r[k]["steady_captions_per_s"], r[k]["startup_s"],
             r[k]["end_to_end_images_per_s"], r[k]["seconds"]] for k in sides]
    rows.append(["**ratio** (pipeline / plain)", round(r["ratio"], 3), None, None, round(r["ratio_end_to_end"], 3),
                 None])
    return [title, "", table(["", "steady images/s", "steady captions/s", "start-up s", "end-to-end images/s",
                              "seconds"], rows), ""]


def _train(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    title = (f"**Student training** ({c['student']} student, {r['student_params']:,} parameters, batch "
             f"{c['batch_size']}, {c['steps']} steps, cache mode; {_machine(r)}):")
    sides = (("plain PyTorch loop (in-memory tensors)", r["plain"]),
             ("Ray Train worker fed by Ray Data", r["ray_train"]))
    if "steady_samples_per_s" not in r["plain"]:  # measured before start-up and steady state were told apart
        return [title, "", table(["", "samples/s"], [[name, f["samples_per_s"]] for name, f in sides]
                                 + [["**ratio** (Ray / plain)", round(r["ratio"], 3)]]), ""]
    rows = [[name, f["steady_samples_per_s"], f["startup_s"], f["end_to_end_samples_per_s"], f["seconds"]]
            for name, f in sides]
    rows.append(["**ratio** (Ray / plain)", round(r["ratio"], 3), None, round(r["ratio_end_to_end"], 3), None])
    return [title, "", table(["", "steady samples/s", "start-up s", "end-to-end samples/s", "seconds"], rows), ""]


def _pipeline(r: dict[str, Any]) -> list[str]:
    title = f"**Stream mode** (one epoch = {r['epoch_steps']} steps; {_machine(r)}):"
    runs = [[f"{r['epochs']} epochs without a cache, s (teacher images embedded)",
             f"{r['no_cache']['seconds']:.1f} ({r['no_cache']['teacher_images_embedded']})"],
            [f"{r['epochs']} epochs with write-through, s (teacher images embedded)",
             f"{r['write_through']['seconds']:.1f} ({r['write_through']['teacher_images_embedded']})"],
            ["**cache saving**", f"{100 * r['cache_saving']:.0f} %"]]
    if "end_to_end" not in r:  # measured before start-up and steady state were told apart
        return [title, "", table(["", "value"], [
            ["teacher alone, s", r["t_teacher_s"]], ["student alone (cache mode), s per epoch", r["t_student_s"]],
            ["stream mode without a cache, s per epoch", r["t_stream_s"]],
            ["**overlap efficiency** (t_teacher + t_student) / t_stream", round(r["overlap_efficiency"], 3)],
            *runs]), ""]
    e = r["end_to_end"]
    startups = " / ".join(f"{r[k]['startup_s']:.1f}" for k in ("teacher_alone", "student_alone", "no_cache"))
    return [title, "", table(["", "steady", "end to end"], [
        ["teacher alone, s per epoch", r["t_teacher_s"], e["t_teacher_s"]],
        ["student alone (cache mode), s per epoch", r["t_student_s"], e["t_student_s"]],
        ["stream mode without a cache, s per epoch", r["t_stream_s"], e["t_stream_s"]],
        ["**overlap efficiency** (t_teacher + t_student) / t_stream", round(r["overlap_efficiency"], 3),
         round(e["overlap_efficiency"], 3)],
        ["start-up s (teacher / student / stream)", startups, None],
        [runs[0][0], None, runs[0][1]], [runs[1][0], None, runs[1][1]],
        ["**cache saving**", f"{100 * r['cache_saving_steady']:.0f} %", runs[2][1]]]), ""]


def render(folder: Path = RESULTS, tag: str | None = None) -> str:
    """The Markdown of every result file in ``folder`` (``<benchmark>[-<tag>].json``), in the README's order."""
    suffix = f"-{tag}" if tag else ""
    out: list[str] = []
    r = _load("teacher_throughput" + suffix, folder)
    if r:
        out += _teacher(r)
    r = _load("train_throughput" + suffix, folder)
    if r:
        out += _train(r)
    r = _load("pipeline" + suffix, folder)
    if r:
        out += _pipeline(r)
    r = _load("scaling" + suffix, folder)
    if r:
        out += [f"**Scaling** ({r['config']['nodes']} Ray nodes; {_machine(r)}): {r['note']}.", "",
                table(["workers", "samples/s (total)", "efficiency"],
                      [[x["workers"], x["samples_per_s"], round(x["efficiency"], 3)] for x in r["rows"]]), ""]
    r = _load("quality" + suffix, folder)
    if r:
        c = r["config"]
        grid = len(c["lrs"]) * len(c["beta2s"]) * len(c["warmups"])
        out += [f"**Quality** ({c['student']} student, batch {c['batch_size']}; DSMD and the baseline each searched "
                f"over the same {grid} settings (learning rate {c['lrs']}, beta2 {c['beta2s']}, warm-up "
                f"{c['warmups']}) at {c['steps']} steps, the {c['finalists']} best on seed 0 with {c['seeds']} seeds, "
                f"chosen on mean validation RSUM; test-split mean and spread over the {c['seeds']} seeds; ablations "
                f"at DSMD's setting):", "", quality_table(r), ""]
        if "gain_rsum" in r:
            out.append(f"DSMD − baseline at {c['steps']} steps: **{r['gain_rsum']:+.1f} RSUM**; the distilled "
                       f"student reaches {100 * r['distilled']['of_teacher']:.1f} % of its teacher's RSUM.")
            out.append("")
        if "gain_rsum" in r.get("converged", {}):
            long = r["converged"]
            line = f"DSMD − baseline at {long['steps']:,} steps: **{long['gain_rsum']:+.1f} RSUM**"
            if "gain_rsum_at_best" in long:
                line += (f"; each run tested at its best validation step (the checkpoint `raydistill run` exports): "
                         f"**{long['gain_rsum_at_best']:+.1f} RSUM**")
            out.append(line + ".")
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split(":", 1)[0])
    p.add_argument("tag", nargs="?", default=None, help="result files <benchmark>-<tag>.json (e.g. gpu)")
    p.add_argument("--results", default=str(RESULTS), help="folder of the result files (default benchmarks/results)")
    args = p.parse_args(argv)
    print(render(Path(args.results), args.tag))


if __name__ == "__main__":
    main(sys.argv[1:])
