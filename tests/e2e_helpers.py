"""Shared pieces of the end-to-end tests: a tiny teacher saved in raydistill's format, tiny run configs."""

from __future__ import annotations

from pathlib import Path

from raydistill.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
TEACHER_DIM = 32


def make_tiny_teacher(path: Path) -> Path:
    """A randomly initialised `test`-preset dual encoder with its own WordPiece vocabulary, saved as a teacher."""
    from raydistill.models.student import build_student, save_dual_encoder
    from raydistill.models.tokenizers import build_wordpiece_tokenizer

    words = "a the small large red green blue yellow circle square triangle star left right above below of"
    tok = build_wordpiece_tokenizer([words] * 4, vocab_size=80)
    model = build_student("test", embed_dim=TEACHER_DIM, vocab_size=len(tok))
    save_dual_encoder(model, path, tokenizer=tok)
    return path


def tiny_overrides(teacher: Path, output_dir: Path, steps: int = 6, batch: int = 32) -> list[str]:
    """Overrides that turn configs/quick.yaml into a run of a few seconds of compute."""
    return [
        f"output_dir={output_dir}",
        "teacher.kind=raydistill",
        f"teacher.checkpoint={teacher}",
        "teacher.pool.batch_size=32",
        "student.preset=test",
        "student.vocab_size=120",
        "data.synth.n_images=120",
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        "train.checkpoint_every=3",
        "train.log_every=2",
        "distill.queue_size=100",
        "ray.no_progress_timeout_s=300",
    ]


def tiny_config(teacher: Path, output_dir: Path, extra: list[str] | None = None, **kw) -> Config:
    return load_config(REPO / "configs" / "quick.yaml", tiny_overrides(teacher, output_dir, **kw) + (extra or []))
