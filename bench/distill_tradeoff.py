"""Speed against quality of a distilled student and its teacher, both exported, measured back to back.

    python bench/distill_tradeoff.py --teacher demo/export --student demo/export-distill --data demo/data/pairs \
        --out demo/distill [--backend ort] [--student-steps 1,2,4]

Runs, through the CLI users type:
  lftk eval TEACHER --backend B --baselines copy               (the teacher's recorded steps and guidance)
  lftk eval STUDENT --backend B --baselines copy --steps S     (each S of --student-steps)
  lftk eval TEACHER ... --steps S --guidance 1 --image-guidance 1  (the teacher at the student's steps and
                                                               calls, undistilled: what distillation must beat)
  lftk eval --compare <teacher report> <student report>        (the student's default steps: paired B - A)
  lftk bench --model TEACHER --backends B --steps <teacher's>
  lftk bench --model STUDENT --backends B --steps 1,2,4
  lftk bench --model TEACHER --backends B --steps 1,2,4 --guidance 1 --image-guidance 1
and prints one table: UNet calls per frame, ms per frame and frames/s (bench's single-frame rollout
figure), the speed-up over the teacher, and the held-out figures (PSNR, PSNR where the scene moves,
hand error, objects missing), with copying the current frame as the floor. OUT keeps every report,
the bench rows (JSON) and tradeoff.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

NO_GUIDANCE = ("--guidance", "1", "--image-guidance", "1")
METRICS = (("psnr", "PSNR (dB)", "{:.2f}"), ("motion_psnr", "PSNR in motion (dB)", "{:.2f}"),
           ("ee_err_px", "hand error (px)", "{:.2f}"), ("obj_missing", "objects missing", "{:.2f}"))


def lftk(*args: str) -> str:
    cmd = [sys.executable, "-m", "lftk.cli", *args]
    print("+ lftk " + " ".join(args), file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"lftk {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout


def summary(report_dir: Path, method: str) -> dict:
    report = json.loads((report_dir / "report.json").read_text())
    return {k: report["summary"][method][k]["mean"] for k, _, _ in METRICS if k in report["summary"][method]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, type=Path, help="the teacher's export dir")
    ap.add_argument("--student", required=True, type=Path, help="the student's export dir")
    ap.add_argument("--data", required=True, type=Path, help="pair dir (its test split is scored)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--student-steps", default="1,2,4")
    ap.add_argument("--frames", type=int, default=15, help="bench rollout length")
    ap.add_argument("--repeats", type=int, default=3, help="bench repeats per row (medians)")
    args = ap.parse_args(argv)

    from lftk.model.base import read_meta
    from lftk.runtime.params import SamplingParams
    from lftk.runtime.sampler import uses_cfg

    student_meta = read_meta(args.student / "pipeline")
    if not student_meta.get("distilled"):
        sys.exit(f"{args.student}: not a distilled student's export (its lftk_model.json has no 'distilled')")
    teacher = SamplingParams.for_model(read_meta(args.teacher / "pipeline"))
    default_steps = SamplingParams.for_model(student_meta).steps
    counts = [int(s) for s in args.student_steps.split(",")]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    common = ["--data", str(args.data), "--backend", args.backend, "--baselines", "copy"]

    lftk("eval", str(args.teacher), *common, "--out", str(out / "eval-teacher"))
    for s in counts:
        lftk("eval", str(args.student), *common, "--steps", str(s), "--out", str(out / f"eval-student-{s}"))
        lftk("eval", str(args.teacher), *common, "--steps", str(s), *NO_GUIDANCE, "--out", str(out / f"eval-teacher-{s}"))
    compared = lftk("eval", "--compare", str(out / "eval-teacher"), str(out / f"eval-student-{default_steps}")) \
        if default_steps in counts else ""
    (out / "compare.txt").write_text(compared)
    bench = ["--backends", args.backend, "--frames", str(args.frames), "--repeats", str(args.repeats)]
    lftk("bench", "--model", str(args.teacher), *bench, "--steps", str(teacher.steps), "--json", str(out / "bench-teacher.json"))
    lftk("bench", "--model", str(args.student), *bench, "--steps", ",".join(map(str, counts)),
         "--json", str(out / "bench-student.json"))
    lftk("bench", "--model", str(args.teacher), *bench, "--steps", ",".join(map(str, counts)), *NO_GUIDANCE,
         "--json", str(out / "bench-teacher-few.json"))

    def speed(path: Path, steps: int) -> dict:
        rows = [r for r in json.loads(path.read_text()) if r["steps"] == steps and str(r.get("status", "")).startswith("ok")]
        return rows[0] if rows else {}

    t_speed = speed(out / "bench-teacher.json", teacher.steps)
    branches = 3 if uses_cfg(teacher.guidance, teacher.image_guidance) else 1
    lines = [
        "| model | steps | UNet calls per frame | ms per frame | frames/s | vs teacher | "
        + " | ".join(h for _, h, _ in METRICS) + " |",
        "| --- " * (6 + len(METRICS)) + "|",
    ]

    def row(name, steps, calls, sp, figures):
        ms, fps = sp.get("ms_per_frame"), sp.get("frames_per_s")
        ratio = fps / t_speed["frames_per_s"] if fps and t_speed.get("frames_per_s") else None
        cells = [name, str(steps), str(calls), f"{ms:.1f}" if ms else "", f"{fps:.2f}" if fps else "",
                 f"{ratio:.1f}x" if ratio else ""]
        cells += [fmt.format(figures[k]) if figures.get(k) is not None else "n/a" for k, _, fmt in METRICS]
        lines.append("| " + " | ".join(cells) + " |")

    row(f"teacher (guidance {teacher.guidance:g} / {teacher.image_guidance:g})", teacher.steps, teacher.steps * branches,
        t_speed, summary(out / "eval-teacher", "model"))
    for s in counts:
        name = "student" + (" (default)" if s == default_steps else "")
        row(name, s, s, speed(out / "bench-student.json", s), summary(out / f"eval-student-{s}", "model"))
    for s in counts:
        row("teacher, no guidance, undistilled", s, s, speed(out / "bench-teacher-few.json", s),
            summary(out / f"eval-teacher-{s}", "model"))
    row("copy the current frame", 0, 0, {}, summary(out / "eval-teacher", "copy"))
    table = "\n".join(lines)
    (out / "tradeoff.md").write_text(table + "\n")
    print(table)
    if compared:
        print(f"\nstudent at {default_steps} steps - teacher, paired over the test pairs:\n{compared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
