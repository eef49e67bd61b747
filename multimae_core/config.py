"""Typed training schema for MultiMAE jobs (torch-free).

Every field carries a docstring, which flows into `jobs/schema.json` and `mmae config schema`. Cross-field checks
raise ``ValueError`` naming the dotted path of the offending field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from multimae_core.modalities import get_modality

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "FinetuneConfig",
    "InitConfig",
    "LossConfig",
    "MaskingConfig",
    "ModalitiesConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainLoopConfig",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True)


class ModelConfig(_Section):
    """Encoder and decoder architecture."""

    preset: Literal["tiny", "small", "base", "large"] = "base"
    """Size preset: tiny (192 wide, 12 deep, 3 heads), small (384/12/6), base (768/12/12, the paper's ViT-B),
    large (1024/24/16). The fields below override single values of the preset."""
    image_size: int = Field(224, ge=16)
    """Input side length in pixels (square inputs)."""
    patch_size: int = Field(16, ge=1)
    """Patch side length in pixels at full resolution."""
    embed_dim: int | None = Field(None, ge=8)
    """Encoder width; null takes the preset's."""
    depth: int | None = Field(None, ge=1)
    """Number of encoder blocks; null takes the preset's."""
    num_heads: int | None = Field(None, ge=1)
    """Encoder attention heads; null takes the preset's."""
    mlp_ratio: float = Field(4.0, gt=0)
    """Hidden width of the encoder MLPs relative to embed_dim."""
    num_global_tokens: int = Field(1, ge=0)
    """Learned global tokens appended after the patch tokens."""
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    """Stochastic depth rate of the last encoder block (linearly spaced from 0)."""
    learnable_pos_emb: bool = False
    """Make the input adapters' 2-D sin-cos position embeddings trainable."""
    decoder_embed_dim: int | None = Field(None, ge=8)
    """Width of the per-modality decoders; null takes the preset's (256 for small and up)."""
    decoder_depth: int | None = Field(None, ge=0)
    """Self-attention blocks per decoder after the cross-attention; null takes the preset's (2)."""
    decoder_num_heads: int | None = Field(None, ge=1)
    """Decoder attention heads; null takes the preset's (8)."""
    decoder_use_task_queries: bool = True
    """Queries are the visible tokens of the decoder's own modality plus mask tokens (the original's default)."""
    decoder_use_xattn: bool = True
    """Decoders cross-attend to the visible tokens of all modalities."""
    semseg_dim_class_emb: int = Field(64, ge=1)
    """Width of the semantic-class embedding of the semseg input adapter."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"model.patch_size ({self.patch_size}) must divide model.image_size ({self.image_size})")
        if self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads:
            raise ValueError("model.num_heads must divide model.embed_dim")
        if self.embed_dim is not None and self.embed_dim % 4:
            raise ValueError("model.embed_dim must be divisible by 4 (2-D sin-cos position embedding)")
        if (
            self.decoder_embed_dim is not None
            and self.decoder_num_heads is not None
            and self.decoder_embed_dim % self.decoder_num_heads
        ):
            raise ValueError("model.decoder_num_heads must divide model.decoder_embed_dim")
        return self


def _check_modalities(names: list[str], path: str, *, need_input: bool = False, need_output: bool = False) -> list[str]:
    for name in names:
        try:
            spec = get_modality(name)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        if need_input and spec.input_adapter is None:
            raise ValueError(f"{path}: modality '{name}' is output-only and cannot be an input")
        if need_output and spec.output_adapter is None:
            raise ValueError(f"{path}: modality '{name}' is input-only and has no reconstruction head")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate modality names in {names}")
    return names


class ModalitiesConfig(_Section):
    """Which modalities the encoder reads and the decoders reconstruct."""

    inputs: list[str] = Field(default_factory=lambda: ["rgb", "depth", "semseg"], min_length=1)
    """Input modalities, in token order; each must be a registered modality (see multimae_core.modalities)."""
    outputs: list[str] = Field(default_factory=lambda: ["rgb", "depth", "semseg", "norm_rgb"])
    """Reconstructed modalities (one decoder each). `norm_rgb` is the extra patch-normalised rgb head."""

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: list[str]) -> list[str]:
        return _check_modalities(v, "modalities.inputs", need_input=True)

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, v: list[str]) -> list[str]:
        return _check_modalities(v, "modalities.outputs", need_output=True)

    @model_validator(mode="after")
    def _targets(self) -> ModalitiesConfig:
        for name in self.outputs:
            spec = get_modality(name)
            target = spec.target or name
            if target not in self.inputs:
                raise ValueError(
                    f"modalities.outputs: '{name}' needs '{target}' among modalities.inputs (its target and mask)"
                )
        return self


class FinetuneConfig(_Section):
    """The downstream task of a fine-tuning job (stage finetune; spec section 7). Defaults are the paper's ViT-B
    heads; tiny models shrink the head sizes. The encoder inputs are modalities.inputs (any subset: RGB, depth,
    RGB-D, ...); the masking and loss sections do not apply to fine-tuning.

    Targets come from the shard modalities: `cls` for cls; the `semseg` labels at full input resolution (cropped and
    resized with nearest neighbour, not the stride-4 input map) for semseg; the metric `depth` (also nearest) for
    depth."""

    kind: Literal["cls", "semseg", "depth"]
    """cls: image classification (mean of all tokens, LayerNorm, linear); semseg: per-pixel classes (the original's
    ConvNeXt head); depth: per-pixel depth (the original's DPT head)."""
    num_classes: int | None = Field(None, ge=1)
    """Classes of cls and semseg (required there; labels must lie in [0, num_classes)); null for depth."""
    ignore_index: int = 255
    """semseg label excluded from the loss and the metrics."""
    reduce_zero_label: bool = False
    """semseg: the stored label 0 means 'unlabelled' (ADE20K, NYUv2): it becomes ignore_index and every other label
    shifts down by one (the original's seg_reduce_zero_label)."""
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    """cls: label smoothing of the cross-entropy."""
    depth_loss: Literal["berhu", "l1"] = "berhu"
    """depth: berHu (reverse Huber, the original's) or L1, over valid pixels."""
    berhu_threshold: float = Field(0.2, gt=0.0, le=1.0)
    """depth: berHu switches from L1 to L2 at this fraction of the batch's largest absolute error."""
    depth_mean: float = 0.0
    """depth: the loss is taken on (depth - depth_mean) / depth_std, in the shards' depth unit (metres for mmae
    shards); the head predicts that standardised depth and metrics de-normalise it (the original's NYU_MEAN)."""
    depth_std: float = Field(1.0, gt=0.0)
    """depth: standard deviation of the fixed standardisation (the original's NYU_STD)."""
    depth_max: float | None = Field(None, gt=0.0)
    """depth: pixels whose depth is at or above this are invalid (sky, out of sensor range) and are left out of the
    loss and metrics; null keeps every finite depth > 0."""
    main_tasks: list[str] | None = None
    """semseg/depth: modalities whose tokens the head reads (channel-concatenated); null: rgb when it is an input,
    else the first input (the original's configs)."""
    cls_init_scale: float = Field(0.001, gt=0.0)
    """cls: the classifier's trunc-normal(0.02) init is scaled by this."""
    seg_embed_dim: int = Field(6144, ge=1)
    """semseg: width each token is projected to before it is split into seg_preds_per_patch sub-tokens."""
    seg_preds_per_patch: int = Field(16, ge=1)
    """semseg: sub-tokens per token, a square number (16: a 4 x 4 block, i.e. 1/4 resolution with 16 px patches)."""
    seg_depth: int = Field(4, ge=0)
    """semseg: ConvNeXt blocks of the head."""
    dpt_hooks: list[int] | None = None
    """depth: the 4 encoder blocks (1-based) DPT taps; null: a quarter, half, three quarters and all of the depth
    (3, 6, 9, 12 for 12 blocks)."""
    dpt_layer_dims: list[int] = Field(default_factory=lambda: [96, 192, 384, 768], min_length=4, max_length=4)
    """depth: channels of DPT's four reassembled maps."""
    dpt_feature_dim: int = Field(256, ge=2)
    """depth: channels of DPT's fusion path."""

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.kind in ("cls", "semseg") and self.num_classes is None:
            raise ValueError(f"finetune.num_classes is required for finetune.kind {self.kind}")
        if self.dpt_hooks is not None and (len(self.dpt_hooks) != 4 or min(self.dpt_hooks) < 1):
            raise ValueError(f"finetune.dpt_hooks must list 4 encoder blocks (1-based), got {self.dpt_hooks}")
        side = int(round(self.seg_preds_per_patch ** 0.5))
        if side * side != self.seg_preds_per_patch:
            raise ValueError(f"finetune.seg_preds_per_patch must be a square number, got {self.seg_preds_per_patch}")
        if self.seg_embed_dim % self.seg_preds_per_patch:
            raise ValueError(f"finetune.seg_embed_dim ({self.seg_embed_dim}) must be divisible by "
                             f"finetune.seg_preds_per_patch ({self.seg_preds_per_patch})")
        return self


class InitConfig(_Section):
    """Weights the model starts from. `mmae finetune --from-run / --from-checkpoint` fills this section in."""

    checkpoint_url: str | None = None
    """Pretrained weights: a local file, an fsspec URL (s3://...), a checkpoint folder (its model.safetensors is
    read) or an MLflow artifact URI (runs:/<run id>/weights/final.safetensors, fetched by the runtime); null starts
    from random init."""
    format: Literal["mmae", "original-multivit", "original-timm", "timm-vit"] = "mmae"
    """mmae: this project's weights (safetensors, the original MultiMAE key layout); original-multivit: the original's
    released MultiViT checkpoints (.pth); original-timm: the original's release in timm ViT layout; timm-vit: MAE or
    timm ViT weights. With the timm formats the rgb adapter and the encoder are filled and the rest initialised."""
    parent_run_id: str | None = Field(None, min_length=1)
    """MLflow run the weights come from (recorded as the lineage of the fine-tuning run)."""
    allow_new_inputs: bool = False
    """Start input adapters the checkpoint lacks from scratch (e.g. RGB-D fine-tuning from RGB-only weights) instead
    of failing; the timm formats always allow it."""


class MaskingConfig(_Section):
    """Dirichlet token budget split across input modalities (paper section 3.1)."""

    num_encoded_tokens: int = Field(98, ge=1)
    """Visible tokens per sample, across all input modalities (98 of 3 x 196 for ViT-B at 224 px)."""
    alphas: float | dict[str, float] = 1.0
    """Dirichlet concentration: one value for all input modalities, or one per modality name."""
    sample_tasks_uniformly: bool = False
    """First pick a non-empty subset of modalities uniformly per sample, then draw the Dirichlet split within it."""

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        values = v.values() if isinstance(v, dict) else [v]
        if any(a <= 0 for a in values):
            raise ValueError("masking.alphas must be positive")
        return v


class LossConfig(_Section):
    """How per-modality losses are taken and combined."""

    weights: dict[str, float] = Field(default_factory=dict)
    """Per-output-modality loss weight; missing modalities weigh 1.0 (the original's plain sum)."""
    loss_on_unmasked: bool = False
    """Take reconstruction losses on all tokens instead of the masked ones only."""

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        for name, weight in v.items():
            if weight < 0:
                raise ValueError(f"loss.weights.{name} must be >= 0, got {weight}")
        return v


class DataConfig(_Section):
    """Where training data comes from."""

    train_url: str = "data/synth/train"
    """Shard folder (manifest.json + tar shards) of the training split: a local path or any fsspec URL (s3://...)."""
    val_url: str | None = "data/synth/val"
    """Shard folder of the validation split; null skips validation."""
    shuffle_buffer: int = Field(256, ge=0)
    """Sample shuffling within shards: above 1 the plain loader permutes each shard's samples every epoch (seeded by
    seed, epoch and shard; exact resume across worker counts) and Ray Data ingest holds this many samples in its local
    shuffle buffer; 0 or 1 keeps the stored order within shards. The shard order is shuffled either way."""
    num_workers: int = Field(2, ge=0)
    """Decode/augment worker processes per training worker in the plain PyTorch path."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """Random-resized-crop area range applied jointly to every modality."""
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    """Probability of the joint horizontal flip."""
    ingest: Literal["loader", "ray"] = "loader"
    """How pretraining workers read the train split: `loader`, the plain PyTorch loader over this worker's shards
    (bit-reproducible, exact resume inside an epoch and across worker counts), or `ray`, Ray Data streaming with
    `streaming_split` (the train split is decoded by the Ray cluster's CPUs; resume inside an epoch is approximate).
    Validation and fine-tuning always use the plain loader."""

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {list(v)}")
        return v


class OptimConfig(_Section):
    """AdamW with linear warmup and cosine decay (the original's pretraining recipe)."""

    blr: float = Field(1.0e-4, gt=0)
    """Base learning rate; the peak rate is blr x global_batch_size / 256."""
    lr: float | None = Field(None, gt=0)
    """Absolute peak learning rate; overrides blr when set."""
    min_lr: float = Field(0.0, ge=0)
    """Learning rate at the end of the cosine decay."""
    warmup_epochs: float = Field(40.0, ge=0)
    """Linear warmup from 0, in epochs (fractional allowed)."""
    warmup_steps: int | None = Field(None, ge=0)
    """Warmup in optimizer steps; overrides warmup_epochs when set."""
    weight_decay: float = Field(0.05, ge=0)
    """AdamW weight decay."""
    decay_all_params: bool = True
    """Decay every trainable parameter, norms and tokens included, as the original pretraining does. False
    exempts biases, norms, tokens and embeddings."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = Field(1.0e-8, gt=0)
    """AdamW epsilon."""
    layer_decay: float | None = Field(None, gt=0, le=1)
    """Layer-wise learning-rate decay (fine-tuning); null disables it."""

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"optim.betas must lie in [0, 1), got {list(v)}")
        return v


class TrainLoopConfig(_Section):
    """Length, batch and numerics of the training loop."""

    epochs: int = Field(1600, ge=1)
    """Passes over the training set (the schedule length unless max_steps is set)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps; also the schedule length when set."""
    global_batch_size: int = Field(2048, ge=1)
    """Samples per optimizer step over all workers; kept fixed when workers come and go."""
    per_worker_batch_size: int = Field(256, ge=1)
    """Samples per forward pass on one worker; gradient accumulation makes up the rest of the global batch."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype of the forward pass (fp16 uses a gradient scaler; the semseg head always runs in fp32)."""
    grad_clip: float | None = Field(None, gt=0)
    """Clip the global gradient norm to this value; null only measures it."""
    log_every_steps: int = Field(10, ge=1)
    """Report metrics every N optimizer steps."""
    image_every_steps: int = Field(200, ge=1)
    """Log a reconstruction figure of a fixed validation batch every N optimizer steps."""
    seed: int = 0
    """Seed of model init, masking, augmentation and shuffling."""
    compile: bool = False
    """Wrap the model in torch.compile."""

    @model_validator(mode="after")
    def _check(self) -> TrainLoopConfig:
        if self.global_batch_size % self.per_worker_batch_size:
            raise ValueError(
                f"train.per_worker_batch_size ({self.per_worker_batch_size}) must divide "
                f"train.global_batch_size ({self.global_batch_size})"
            )
        return self


class CheckpointConfig(_Section):
    """Checkpoint storage and cadence."""

    storage_url: str = ".mmae/checkpoints"
    """Where checkpoints go: a local folder or an object-store URL such as s3://bucket/prefix."""
    every_steps: int = Field(500, ge=1)
    """Write a checkpoint every N optimizer steps (and at the end)."""
    keep: int = Field(2, ge=1)
    """Checkpoints kept; older ones are deleted."""


class TrainConfig(_Section):
    """A complete MultiMAE training job, as a job YAML file spells it."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Job name; also the MLflow run name prefix and the checkpoint folder name."""
    stage: Literal["pretrain", "finetune"] = "pretrain"
    """Pretraining (masked multi-modal reconstruction) or fine-tuning."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Architecture."""
    modalities: ModalitiesConfig = Field(default_factory=ModalitiesConfig)
    """Input and output modalities."""
    finetune: FinetuneConfig | None = None
    """The downstream task; required for stage finetune, null for pretraining."""
    init: InitConfig = Field(default_factory=InitConfig)
    """Weights to start from (fine-tuning)."""
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    """Token budget and its split across modalities."""
    loss: LossConfig = Field(default_factory=LossConfig)
    """Loss weights and where losses are taken."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Training and validation data."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    """Loop length, batch sizes and numerics."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoint storage and cadence."""

    @model_validator(mode="after")
    def _cross(self) -> TrainConfig:
        if isinstance(self.masking.alphas, dict):
            for name in self.masking.alphas:
                if name not in self.modalities.inputs:
                    raise ValueError(
                        f"masking.alphas: '{name}' is not among modalities.inputs {self.modalities.inputs}"
                    )
            missing = [name for name in self.modalities.inputs if name not in self.masking.alphas]
            if missing:
                raise ValueError(
                    f"masking.alphas: no value for {missing}; give one per input modality, or a single number"
                )
        if self.stage == "pretrain" and not self.modalities.outputs:
            raise ValueError("modalities.outputs: pretraining needs at least one output modality")
        if self.stage == "finetune":
            self._check_finetune()
            if self.data.ingest != "loader":
                raise ValueError("data.ingest: fine-tuning reads its task targets through the plain loader; use loader")
        elif self.finetune is not None:
            raise ValueError("finetune: the task section is for stage finetune; set it to null for pretraining")
        elif self.init.checkpoint_url is not None:
            raise ValueError("init.checkpoint_url: starting from weights is for stage finetune")
        for name in self.loss.weights:
            if name not in self.modalities.outputs:
                raise ValueError(f"loss.weights: '{name}' is not among modalities.outputs {self.modalities.outputs}")
        num_patches = (self.model.image_size // self.model.patch_size) ** 2
        total = num_patches * len(self.modalities.inputs)
        if self.stage == "pretrain" and self.masking.num_encoded_tokens > total:
            raise ValueError(
                f"masking.num_encoded_tokens ({self.masking.num_encoded_tokens}) exceeds the {total} tokens of "
                f"{len(self.modalities.inputs)} input modalities at model.image_size {self.model.image_size}"
            )
        for name in self.modalities.inputs:
            stride = get_modality(name).stride_level
            if self.model.patch_size % stride:
                raise ValueError(f"modalities.inputs: stride level {stride} of '{name}' must divide model.patch_size")
        return self

    def _check_finetune(self) -> None:
        if self.finetune is None:
            raise ValueError("finetune: stage finetune needs the task section (finetune.kind, finetune.num_classes, "
                             "...)")
        if self.modalities.outputs:
            raise ValueError(f"modalities.outputs: fine-tuning has no reconstruction heads (the task head is "
                             f"finetune.kind); set it to [] (got {self.modalities.outputs})")
        main = self.finetune.main_tasks
        if main is not None and (not main or any(m not in self.modalities.inputs for m in main)):
            raise ValueError(f"finetune.main_tasks {main} must be a non-empty subset of modalities.inputs "
                             f"{self.modalities.inputs}")
        depth = self.model.depth
        if self.finetune.dpt_hooks is not None and depth is not None and max(self.finetune.dpt_hooks) > depth:
            raise ValueError(f"finetune.dpt_hooks {self.finetune.dpt_hooks} must be encoder blocks in 1..{depth} "
                             f"(model.depth)")
