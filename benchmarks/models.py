"""Realistic models without downloads: a BEiT-3 of an official size, randomly initialised, saved in the
official checkpoint format (``{"model": state_dict}`` + a SentencePiece model) so that it goes through the
same loader as a real teacher. Random weights cost exactly what trained ones cost to run."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from benchmarks import common


def random_beit3_teacher(folder: Path, size: str = "large", image_size: int = 224, device: str = "cpu",
                         dtype: str | None = None) -> dict[str, Any]:
    """Write a random BEiT-3 ``size`` checkpoint at ``image_size`` px into ``folder``; return its teacher spec."""
    import sentencepiece as spm
    import torch

    from raydistill.models.teachers.beit3_arch import BEiT3Retrieval, make_config

    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, tokenizer = folder / "beit3.pth", folder / "beit3.spm"
    if not tokenizer.is_file():
        captions = [c for r in common.synth_records(1500, 48) for c in r["captions"]]
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(captions), model_writer=buffer, vocab_size=400, model_type="unigram",
            character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
            hard_vocab_limit=False, minloglevel=2)
        tokenizer.write_bytes(buffer.getvalue())
    if not checkpoint.is_file():
        torch.manual_seed(0)
        model = BEiT3Retrieval(make_config(size, {"img_size": image_size}))
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        torch.save({"model": state}, checkpoint)
    return {"kind": "beit3", "checkpoint": str(checkpoint), "tokenizer": str(tokenizer), "size": size,
            "device": device, "dtype": dtype or ("bfloat16" if device.startswith("cuda") else "float32")}
