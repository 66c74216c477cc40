"""The configuration's schema: one pydantic model per section of a run's YAML file, and the cross-field rules.

Every field carries its default and its documentation (``description``); :mod:`raydistill.config.loading` reads
files and overrides into these models.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from raydistill.errors import UserError

DISTILL_TERMS = ("feature", "cosine", "contrastive", "hard_negative")
BALANCER_KINDS = ("dsmd", "dsmd_rate", "fixed", "dwa", "uncertainty")


class ConfigError(UserError, ValueError):
    """A config file, key or value is wrong; the message says which and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Section):
    """Parameters of the embedded synthetic captioned-scenes dataset (``data.source: synth``)."""

    n_images: int = Field(1500, gt=10, description="Number of generated images (all splits).")
    image_size: int = Field(64, ge=16, le=512, description="Side of the generated square images, pixels.")
    seed: int = Field(0, description="Generator seed: the same seed gives byte-identical files.")
    min_captions: int = Field(3, ge=1, description="Fewest captions per image.")
    max_captions: int = Field(5, ge=1, description="Most captions per image.")


class CocoSplit(_Section):
    """One split of an official COCO captions source."""

    captions: str = Field(description="captions_*.json file of this split.")
    images: str = Field(description="Folder holding this split's images (e.g. val2017/).")


class DataConfig(_Section):
    """Where the image-caption data comes from and how images are decoded."""

    source: Literal["synth", "karpathy", "coco", "manifest", "webdataset"] = Field(
        "synth", description="Source format: synth | karpathy | coco | manifest | webdataset."
    )
    path: str | None = Field(
        None,
        description="Karpathy/COCO JSON, manifest (.parquet/.jsonl) or shard pattern; local or s3:// gs://.",
    )
    image_root: str | None = Field(None, description="Folder (or URI) that image paths are relative to.")
    coco_splits: dict[str, CocoSplit] = Field(
        default_factory=dict,
        description="COCO captions only: split name -> {captions: captions_*.json, images: folder}.",
    )
    synth: SynthConfig = Field(default_factory=SynthConfig, description="Synthetic dataset parameters.")
    train_split: str = Field("train", description="Split the student trains on.")
    val_split: str | None = Field("val", description="Split for per-epoch validation (null: none).")
    test_split: str = Field("test", description="Split the final evaluation uses.")
    decode_size: int = Field(
        64, ge=8, le=1024, description="Images are decoded, resized (shorter side) and centre-cropped to this."
    )
    on_bad_image: Literal["skip", "fail"] = Field(
        "skip", description="A corrupt or missing image: skip it and count it, or stop the run."
    )
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="With on_bad_image=skip, stop if more than this share is bad."
    )
    max_pixels: int = Field(89_478_485, gt=0, description="Decompression-bomb limit (width x height).")
    limit_images: int | None = Field(None, gt=0, description="Use only the first N images of each split.")
    decode_cpus: float = Field(
        1.0, gt=0, description="CPUs each decoding (and caption-row) Ray Data task reserves."
    )


class PoolConfig(_Section):
    """Resources and placement of the teacher's Ray Data actor pool."""

    min_size: int = Field(1, ge=1, description="Fewest teacher actors.")
    max_size: int = Field(1, ge=1, description="Most teacher actors (autoscaling between min and max).")
    num_gpus: float = Field(0, ge=0, description="GPUs per teacher actor (0 on CPU-only machines).")
    num_cpus: float = Field(1, gt=0, description="CPUs per teacher actor.")
    batch_size: int = Field(64, gt=0, description="Images per teacher call (Ray Data batch).")
    label_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels a teacher actor must land on, e.g. raydistill/role: teacher."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom resources per actor, e.g. {teacher_node: 1}."
    )

    @model_validator(mode="after")
    def _sizes(self) -> PoolConfig:
        if self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) must be >= min_size ({self.min_size})")
        return self


class TeacherConfig(_Section):
    """The frozen teacher (see raydistill.models.teachers.load_teacher)."""

    kind: Literal["raydistill", "beit3", "hf_clip", "open_clip", "demo"] = Field(
        "demo", description="raydistill | beit3 | hf_clip | open_clip | demo (the embedded demo teacher)."
    )
    checkpoint: str | None = Field(None, description="Weights: a local file/folder (or a hub name/tag).")
    tokenizer: str | None = Field(None, description="Tokenizer file/folder (BEiT-3: the beit3.spm file).")
    size: str | None = Field(None, description="Architecture preset (BEiT-3: base | large).")
    arch: dict[str, Any] | str | None = Field(
        None, description="BEiT-3: EncoderConfig fields overriding the preset; open_clip: the model name or config JSON."
    )
    max_len: int | None = Field(None, gt=2, description="Caption tokens (BEiT-3 default 64; HF CLIP: the model's).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Inference dtype.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto | cpu | cuda | cuda:N.")
    infer_batch_size: int = Field(64, gt=0, description="Mini-batch size inside one teacher call.")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="Actor-pool resources and placement.")
    in_driver: bool = Field(
        True,
        description="Deprecated and ignored (accepted so older configs still load): the teacher runs only in its "
        "actor pool, and a probe task reads its dimension and fingerprint where the pool runs.",
    )

    @model_validator(mode="after")
    def _needs_checkpoint(self) -> TeacherConfig:
        if self.kind != "demo" and not self.checkpoint:
            raise ValueError(f"teacher.kind={self.kind} needs teacher.checkpoint (a local path or hub name)")
        if self.kind == "beit3" and not self.tokenizer:
            raise ValueError("teacher.kind=beit3 needs teacher.tokenizer (the beit3.spm SentencePiece file)")
        return self


class CacheConfig(_Section):
    """How the students are fed: straight from the teacher pool, or from the Parquet embedding cache."""

    mode: Literal["stream", "cache"] = Field(
        "stream", description="stream: teacher pool feeds training; cache: read a complete cache only."
    )
    dir: str | None = Field(None, description="Cache folder (default <output_dir>/cache). Local or s3://.")
    write_through: bool = Field(
        True, description="stream mode: write embeddings to the cache on the first pass; later epochs hit it."
    )


class StudentConfig(_Section):
    """The student dual encoder (see raydistill.models.student)."""

    # The presets that DSMD starts from pretrained towers (an ImageNet-21k ViT and a pretrained BERT), each
    # with the public weights that fit it: (timm name, Hugging Face name). The CPU presets test, demo and
    # demo_teacher are meant to train from scratch.
    PRETRAINED_TOWERS: ClassVar[dict[str, tuple[str, str]]] = {
        "tiny": ("vit_tiny_patch16_224.augreg_in21k", "google/bert_uncased_L-4_H-256_A-4"),
        "small": ("vit_small_patch16_224.augreg_in21k", "google/bert_uncased_L-4_H-512_A-8"),
        "base": ("vit_base_patch16_224.augreg_in21k", "bert-base-uncased"),
    }

    preset: str = Field("demo", description="Size preset: test | demo | tiny | small | base | demo_teacher.")
    tokenizer: str | None = Field(
        None, description="Tokenizer folder/vocab.txt/hub name; null: build WordPiece from training captions."
    )
    vocab_size: int = Field(4000, gt=10, description="Size of the WordPiece vocabulary built when tokenizer=null.")
    vision_weights: str | None = Field(
        None,
        description="Pretrained image tower: a timm checkpoint file or a timm pretrained name "
        "(vit_base_patch16_224.augreg_in21k; from the Hugging Face cache when offline).",
    )
    text_weights: str | None = Field(
        None,
        description="Pretrained text tower: a Hugging Face save_pretrained folder or hub name (bert-base-uncased; "
        "from the Hugging Face cache when offline). Needs student.tokenizer: the model's own tokenizer.",
    )
    from_scratch: bool = Field(
        False,
        description="tiny/small/base: train without pretrained towers on purpose (a tower without weights starts "
        "random). Without it those presets need vision_weights and text_weights.",
    )
    text_pooling: Literal["auto", "pooler", "cls", "mean"] = Field(
        "auto",
        description="Text feature fed to the head: BERT's pooler output, the CLS hidden state, or the mean of the "
        "tokens' final states; auto: the pooler with text_weights, the CLS state without (a random pooler is an "
        "untrained extra layer).",
    )
    max_len: int | None = Field(None, gt=2, description="Caption tokens (default: the preset's).")
    embed_dim: int | None = Field(
        None, gt=0, description="Output dimension; null: the teacher's (required for ground_truth runs)."
    )

    @model_validator(mode="after")
    def _pretrained_towers(self) -> StudentConfig:
        if self.text_weights and not self.tokenizer:
            raise ValueError(
                f"student.text_weights ({self.text_weights}) needs student.tokenizer set to that model's own "
                f"tokenizer (e.g. the same name or folder): a vocabulary built from the captions does not match "
                f"its token embeddings"
            )
        towers = self.PRETRAINED_TOWERS.get(self.preset)
        missing = [f"student.{key}" for key in ("vision_weights", "text_weights") if not getattr(self, key)]
        if towers and missing and not self.from_scratch:
            vision, text = towers
            raise ValueError(
                f"student.preset={self.preset} starts from pretrained towers (the DSMD recipe), but "
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Set "
                f"student.vision_weights: {vision}, student.text_weights: {text} and student.tokenizer: {text} "
                f"(timm and Hugging Face names, read from the Hugging Face cache when offline, or local "
                f"files/folders), or set student.from_scratch: true to train from random initialisation"
            )
        return self


class DistillConfig(_Section):
    """The training objective: DSMD distillation, or ground-truth contrastive (baseline / teacher fitting)."""

    objective: Literal["dsmd", "ground_truth"] = Field(
        "dsmd", description="dsmd: the four distillation losses; ground_truth: image-text InfoNCE, no teacher."
    )
    terms: list[str] = Field(list(DISTILL_TERMS), description="Enabled DSMD terms (remove one to ablate it).")
    temperature: float = Field(0.05, gt=0, description="Contrastive-distillation temperature tau.")
    margin: float = Field(0.05, ge=0, description="Hard-negative hinge margin m.")
    max_violation: bool = Field(True, description="Hard negative: hardest negative only (VSE++).")
    mask_same_image: bool = Field(True, description="Drop same-image pairs from negatives (false: reference).")
    queue_size: int = Field(8192, gt=0, description="Teacher-embedding queue length K.")
    gt_temperature: float = Field(0.07, gt=0, description="ground_truth: initial temperature.")
    gt_learnable_temperature: bool = Field(True, description="ground_truth: learn the temperature.")

    @field_validator("terms")
    @classmethod
    def _known_terms(cls, terms: list[str]) -> list[str]:
        unknown = [t for t in terms if t not in DISTILL_TERMS]
        if unknown:
            raise ValueError(f"unknown term(s) {unknown}; allowed: {list(DISTILL_TERMS)}")
        if not terms:
            raise ValueError(f"at least one term is needed; allowed: {list(DISTILL_TERMS)}")
        if len(set(terms)) != len(terms):
            raise ValueError(f"duplicate terms in {terms}")
        return terms


class BalancerConfig(_Section):
    """Loss balancer (see raydistill.method.balancers)."""

    kind: Literal["dsmd", "dsmd_rate", "fixed", "dwa", "uncertainty"] = Field(
        "dsmd", description="dsmd | dsmd_rate | fixed | dwa | uncertainty."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Balancer hyper-parameters, e.g. {k: 10, temperature: 1.0}."
    )


class TrainConfig(_Section):
    """Optimisation and the Ray Train worker group."""

    steps: int | None = Field(None, gt=0, description="Total optimizer steps (wins over epochs).")
    epochs: int = Field(1, gt=0, description="Passes over the training split when steps is null.")
    batch_size: int = Field(128, gt=1, description="Caption-level samples per step, per worker.")
    lr: float = Field(1e-4, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    adam_beta2: float = Field(
        0.999, gt=0, lt=1, description="AdamW beta2 (beta1 is 0.9); CLIP trains with 0.98."
    )
    schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="LR schedule after warm-up.")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear warm-up.")
    step_decay_at: float = Field(2 / 3, gt=0, lt=1, description="schedule=step: decay x0.1 at this share.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient norm (null: no clipping).")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field("auto", description="Mixed precision (auto: bf16 on GPU).")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks).")
    use_gpu: Literal["auto", "yes", "no"] = Field("auto", description="Workers on GPUs (auto: if any).")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Custom resources.")
    label_selector: dict[str, str] = Field(default_factory=dict, description="Node labels for workers.")
    shuffle: Literal["global", "files"] = Field(
        "global",
        description="Each epoch's image order: global = a full seeded shuffle (a sort by a hash of seed, epoch and "
        "image id: one exchange of the light image rows per epoch); files = the source's or cache's order.",
    )
    shuffle_buffer: int = Field(
        1024, ge=0, description="Caption rows mixed together in the worker (a seeded window shuffle), 0: off."
    )
    materialize: bool = Field(
        False,
        description="Deprecated and ignored (accepted so older configs still load): with cache.write_through, "
        "epochs after the first read the embedding cache and start no teacher.",
    )
    storage_path: str | None = Field(
        None, description="Ray Train checkpoints: local folder or s3:// (multi-node: shared); default <output_dir>/ray_train."
    )
    checkpoint_every: int = Field(100, gt=0, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept.")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts from the last checkpoint.")
    log_every: int = Field(10, gt=0, description="Log losses/weights/throughput every N steps.")
    eval_every: int | None = Field(None, gt=0, description="Validation RSUM every N steps (null: at the end).")
    seed: int = Field(0, description="Seed for initialisation, shuffling and the queues.")

    @field_validator("amp", "use_gpu", mode="before")
    @classmethod
    def _yaml_words(cls, value: Any, info: Any) -> Any:
        # YAML 1.1 reads `amp: off` and `use_gpu: yes|no` as booleans: give back the words that were written.
        words = {("amp", False): "off", ("use_gpu", True): "yes", ("use_gpu", False): "no"}
        return words.get((info.field_name, value), value) if isinstance(value, bool) else value


class EvalConfig(_Section):
    """Final retrieval evaluation."""

    batch_size: int = Field(256, gt=0, description="Images/captions per student forward pass.")
    chunk_size: int = Field(1024, gt=0, description="Similarity rows computed at once.")
    local_max_images: int = Field(
        2000,
        ge=0,
        description="Deprecated and ignored (accepted so older configs still load): evaluation splits are always "
        "read and decoded by Ray Data tasks.",
    )


class TrackingConfig(_Section):
    """MLflow tracking."""

    enabled: bool = Field(True, description="Log to MLflow.")
    uri: str | None = Field(None, description="Tracking URI; null: $MLFLOW_TRACKING_URI or <output_dir>/mlflow.db.")
    experiment: str = Field("raydistill", description="MLflow experiment name.")


class RayConfig(_Section):
    """The Ray instance a run uses."""

    address: str | None = Field(
        None, description="null: connect to $RAY_ADDRESS or a running cluster, else start a local one."
    )
    num_cpus: int | None = Field(None, gt=0, description="Logical CPUs of a local instance.")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local instance.")
    object_store_mb: int | None = Field(None, gt=50, description="Object store of a local instance, MiB.")
    dashboard: bool = Field(
        True, description="Start the dashboard (127.0.0.1) with a local instance; Train's cleanup needs its State API."
    )
    no_progress_timeout_s: float = Field(600, gt=0, description="Ray Data fails after this long without progress.")
    data_object_store_mb: Annotated[int, Field(gt=0)] | Literal["auto"] | None = Field(
        "auto",
        description="Object-store memory (MiB) each Ray Data pipeline may hold: its streaming back-pressure keeps "
        "it under this whatever the dataset's size, and the reader works that far ahead of training. auto: 16 "
        "training batches of rows, at least 256 and at most 2048; null: Ray Data's own default budget.",
    )
    shuffle_partitions: int = Field(
        16,
        gt=0,
        description="Hash partitions of the pipeline's exchanges: grouping a manifest's rows by image and the "
        "anti-join that finds what a partial cache lacks (at least this many: see shuffle_partition_rows), and "
        "train.shuffle: global's sort.",
    )
    shuffle_partition_rows: int | None = Field(
        5000,
        gt=0,
        description="The most image rows one partition of a source's exchange (grouping a manifest by image, the "
        "anti-join) holds: a larger source gets more partitions than shuffle_partitions. A partition leaves its "
        "reducer as one block in the object store, so this bounds the store whatever the dataset's size. null: "
        "always shuffle_partitions.",
    )


class Config(_Section):
    """One experiment."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9._-]+$", description="Run name (letters, digits, . _ -).")
    output_dir: str = Field("raydistill_runs", description="Runs, checkpoints, cache and the default MLflow store.")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    balancer: BalancerConfig = Field(default_factory=BalancerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> Config:
        if self.data.source == "coco" and not self.data.coco_splits:
            raise ValueError("data.source=coco needs data.coco_splits: {split: {captions: ..., images: ...}}")
        if self.data.source not in ("synth", "coco") and not self.data.path:
            raise ValueError(f"data.source={self.data.source} needs data.path")
        if self.distill.objective == "ground_truth" and self.cache.mode == "cache":
            raise ValueError("distill.objective=ground_truth uses no teacher, so cache.mode=cache has nothing to read")
        if self.distill.objective == "ground_truth" and self.student.embed_dim is None:
            raise ValueError("distill.objective=ground_truth needs student.embed_dim (there is no teacher to set it)")
        if self.balancer.kind == "fixed" and isinstance(self.balancer.params.get("weights"), dict):
            extra = set(self.balancer.params["weights"]) - set(self.distill.terms)
            if extra:
                raise ValueError(f"balancer.params.weights names terms not in distill.terms: {sorted(extra)}")
        return self

    @property
    def uses_teacher(self) -> bool:
        """Whether this run needs teacher embeddings."""
        return self.distill.objective == "dsmd"
