"""Fine-tuning heads on the unmasked MultiMAE encoder, the model that joins encoder and head, and pretrained loading.

Shapes: B batch, N tokens of one modality (nh x nw grid), G global tokens, E encoder width, C classes or channels,
H x W input pixels. Heads follow the adapter contract: built without the encoder width, bound by `init(embed_dim)`,
called as `head(tokens, layout)` with the `TokenLayout` of the concatenated inputs.

- classification: `LinearOutputAdapter` (model/output_adapters.py) -- mean over all tokens, LayerNorm, Linear.
- semantic segmentation: `ConvNeXtSegHead`, the original's `ConvNeXtAdapter` (spec 7.3).
- depth: `DPTDepthHead`, the original's `DPTOutputAdapter` with the regression head (spec 7.4; DPT, Ranftl et al.
  2021, arXiv:2103.13413).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimae_core.model.blocks import layer_norm
from multimae_core.model.multimae import encode_unmasked
from multimae_core.model.output_adapters import LinearOutputAdapter, TokenLayout

__all__ = [
    "ConvNeXtBlock",
    "ConvNeXtSegHead",
    "DPTDepthHead",
    "EncoderLoadReport",
    "FinetuneModel",
    "LinearOutputAdapter",
    "default_dpt_hooks",
    "load_pretrained_encoder",
]

logger = logging.getLogger(__name__)


def _main_tokens(tokens_BTE: Tensor, layout: TokenLayout, main_tasks: Sequence[str]) -> Tensor:
    """Tokens of the main modalities, concatenated on channels: `[B, N, E * len(main_tasks)]` (global tokens dropped).

    All main modalities must share one token grid (they do when they share the patch grid of the image).
    """
    parts = []
    for name in main_tasks:
        span = layout.span(name)
        if span is None:
            present = ", ".join(m for m, _ in layout.modalities)
            raise ValueError(f"the head reads modality '{name}', which is not among the inputs ({present})")
        parts.append(tokens_BTE[:, span[0]:span[1]])
    if len({p.shape[1] for p in parts}) != 1:
        raise ValueError(f"main modalities {list(main_tasks)} have different token counts "
                         f"{[p.shape[1] for p in parts]}; they must share one grid")
    return torch.cat(parts, dim=-1)


def _grid(layout: TokenLayout, num_tokens: int, patch_size: int) -> tuple[int, int]:
    H, W = layout.image_size
    nh, nw = H // patch_size, W // patch_size
    if nh * nw != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form the {nh}x{nw} grid of a {H}x{W} image with "
                         f"{patch_size}px patches")
    return nh, nw


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022): depthwise 7x7, LayerNorm, Linear 4x, GELU, Linear, residual.

    No layer scale and no stochastic depth, as the original head uses it. Shapes: `[B, C, h, w]` in and out.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = layer_norm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x_BChw: Tensor) -> Tensor:
        # Channels-last for the norm and the pointwise linears (the original's faster variant).
        y_BhwC = self.dwconv(x_BChw).permute(0, 2, 3, 1)
        y_BhwC = self.pwconv2(self.act(self.pwconv1(self.norm(y_BhwC))))
        return x_BChw + y_BhwC.permute(0, 3, 1, 2)


def _init_trunc_normal(module: nn.Module) -> None:
    # The original heads' `_init_weights`: Linear trunc-normal(0.02) with zero bias, LayerNorm 1/0; convs keep
    # PyTorch's default init.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ConvNeXtSegHead(nn.Module):
    """Semantic segmentation head (the original's `ConvNeXtAdapter`): tokens -> logits `[B, num_classes, H, W]`.

    Each main-modality token (modalities concatenated on channels) is projected to `embed_dim` channels and split
    into `preds_per_patch` sub-tokens of `embed_dim / preds_per_patch` channels laid out as a square block, giving a
    map at `sqrt(preds_per_patch) / patch_size` of the input resolution (1/4 with the defaults 6144 / 16 / 16px).
    `depth` ConvNeXt blocks and a 1x1 conv give class logits, upsampled bilinearly to the input size.
    """

    def __init__(self, num_classes: int, *, main_tasks: Sequence[str] = ("rgb",), patch_size: int = 16,
                 embed_dim: int = 6144, preds_per_patch: int = 16, depth: int = 4,
                 interpolate_mode: str = "bilinear", encoder_embed_dim: int | None = None) -> None:
        super().__init__()
        side = math.isqrt(preds_per_patch)
        if side * side != preds_per_patch:
            raise ValueError(f"preds_per_patch must be a perfect square, got {preds_per_patch}")
        if embed_dim % preds_per_patch:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by preds_per_patch ({preds_per_patch})")
        if not main_tasks:
            raise ValueError("main_tasks must name at least one input modality")
        self.num_classes = num_classes
        self.main_tasks = tuple(main_tasks)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.preds_per_patch = preds_per_patch
        self.sub_side = side
        self.class_dim = embed_dim // preds_per_patch
        self.interpolate_mode = interpolate_mode
        self.blocks = nn.Sequential(*[ConvNeXtBlock(self.class_dim) for _ in range(depth)])
        self.final_layer = nn.Conv2d(self.class_dim, num_classes, kernel_size=1)
        self.apply(_init_trunc_normal)
        self.encoder_embed_dim: int | None = None
        if encoder_embed_dim is not None:
            self.init(embed_dim=encoder_embed_dim)

    def init(self, embed_dim: int) -> None:
        """Bind the encoder width: creates `proj_dec` (E * len(main_tasks) -> embed_dim)."""
        self.encoder_embed_dim = embed_dim
        self.proj_dec = nn.Linear(embed_dim * len(self.main_tasks), self.embed_dim)
        _init_trunc_normal(self.proj_dec)

    def forward(self, tokens_BTE: Tensor, layout: TokenLayout) -> Tensor:
        x_BNX = self.proj_dec(_main_tokens(tokens_BTE, layout, self.main_tasks))
        B, N, _ = x_BNX.shape
        nh, nw = _grid(layout, N, self.patch_size)
        s, c = self.sub_side, self.class_dim
        # "b (nh nw) (ph pw c) -> b c (nh ph) (nw pw)": sub-token p of a patch sits at row p // s, column p % s.
        x = x_BNX.reshape(B, nh, nw, s, s, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, nh * s, nw * s)
        x = self.final_layer(self.blocks(x))
        return F.interpolate(x, size=layout.image_size, mode=self.interpolate_mode)


class _ResidualConvUnit(nn.Module):
    """ReLU -> 3x3 conv -> ReLU -> 3x3 conv, plus the input (DPT's `ResidualConvUnit_custom` without BN)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _FusionBlock(nn.Module):
    """RefineNet-style fusion (DPT's `FeatureFusionBlock_custom`): add the refined skip, refine, upsample, 1x1 conv.

    The deepest block has no skip input; unlike the original we then do not create its unused `resConfUnit1`, so DDP
    needs no `find_unused_parameters`.
    """

    def __init__(self, features: int, *, has_skip: bool) -> None:
        super().__init__()
        if has_skip:
            self.resConfUnit1 = _ResidualConvUnit(features)
        self.resConfUnit2 = _ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(self, x: Tensor, skip: Tensor | None, size: tuple[int, int]) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        # The original upsamples by a factor 2 with align_corners=True. With align_corners=True PyTorch derives the
        # sampling grid from the sizes alone, so an explicit `size` of twice the input is bit-identical, and it
        # also lines up with the next skip when the token grid is odd.
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


def default_dpt_hooks(depth: int) -> tuple[int, int, int, int]:
    """1-based encoder layers DPT taps: a quarter, half, three quarters and all of the depth (12 -> 3, 6, 9, 12)."""
    return tuple(max(1, round(depth * k / 4)) for k in (1, 2, 3, 4))  # type: ignore[return-value]


class DPTDepthHead(nn.Module):
    """Dense regression head (the original's `DPTOutputAdapter`, `head_type='regression'`): `[B, C, H, W]` output.

    Taps four encoder layers (`hooks`, 1-based), reassembles each main-modality token map at 4x, 2x, 1x and 1/2x of
    the token grid (`layer_dims` channels), projects all to `feature_dim` with 3x3 convs, fuses them deepest to
    shallowest with RefineNet blocks (each upsampling 2x) and predicts at full resolution with a small conv head.
    The default sizes are ViT-B's; with patch size 16 the output is exactly the input size (other patch sizes get a
    final bilinear resize).
    """

    def __init__(self, num_channels: int = 1, *, main_tasks: Sequence[str] = ("rgb",), patch_size: int = 16,
                 hooks: Sequence[int] = (3, 6, 9, 12), layer_dims: Sequence[int] = (96, 192, 384, 768),
                 feature_dim: int = 256, head_hidden_dim: int = 32, encoder_embed_dim: int | None = None) -> None:
        super().__init__()
        if len(hooks) != 4 or len(layer_dims) != 4:
            raise ValueError(f"DPT needs 4 hooks and 4 layer_dims, got {list(hooks)} and {list(layer_dims)}")
        if any(h < 1 for h in hooks):
            raise ValueError(f"DPT hooks are 1-based encoder layers, got {list(hooks)}")
        if not main_tasks:
            raise ValueError("main_tasks must name at least one input modality")
        self.num_channels = num_channels
        self.main_tasks = tuple(main_tasks)
        self.patch_size = patch_size
        self.hooks = tuple(int(h) for h in hooks)
        self.layer_dims = tuple(int(d) for d in layer_dims)
        self.feature_dim = feature_dim
        self.scratch = nn.Module()
        self.scratch.layer_rn = nn.ModuleList([
            nn.Conv2d(d, feature_dim, kernel_size=3, padding=1, bias=False) for d in self.layer_dims])
        self.scratch.refinenet1 = _FusionBlock(feature_dim, has_skip=True)
        self.scratch.refinenet2 = _FusionBlock(feature_dim, has_skip=True)
        self.scratch.refinenet3 = _FusionBlock(feature_dim, has_skip=True)
        self.scratch.refinenet4 = _FusionBlock(feature_dim, has_skip=False)
        self.head = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim // 2, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(feature_dim // 2, head_hidden_dim, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(head_hidden_dim, num_channels, kernel_size=1),
        )
        self.encoder_embed_dim: int | None = None
        if encoder_embed_dim is not None:
            self.init(embed_dim=encoder_embed_dim)

    def init(self, embed_dim: int) -> None:
        """Bind the encoder width: creates the four reassemble stages (`act_postprocess`)."""
        self.encoder_embed_dim = embed_dim
        E = embed_dim * len(self.main_tasks)
        d1, d2, d3, d4 = self.layer_dims
        self.act_postprocess = nn.ModuleList([
            nn.Sequential(nn.Conv2d(E, d1, kernel_size=1), nn.ConvTranspose2d(d1, d1, kernel_size=4, stride=4)),
            nn.Sequential(nn.Conv2d(E, d2, kernel_size=1), nn.ConvTranspose2d(d2, d2, kernel_size=2, stride=2)),
            nn.Sequential(nn.Conv2d(E, d3, kernel_size=1)),
            nn.Sequential(nn.Conv2d(E, d4, kernel_size=1), nn.Conv2d(d4, d4, kernel_size=3, stride=2, padding=1)),
        ])

    def forward(self, layers: Sequence[Tensor], layout: TokenLayout) -> Tensor:
        """`layers` are the outputs of the encoder blocks named by `hooks`, in that order, each `[B, T, E]`."""
        if len(layers) != 4:
            raise ValueError(f"DPT needs the 4 tapped encoder layers {self.hooks}, got {len(layers)} tensors")
        feats = []
        for i, tokens_BTE in enumerate(layers):
            x_BNE = _main_tokens(tokens_BTE, layout, self.main_tasks)
            B, N, E = x_BNE.shape
            nh, nw = _grid(layout, N, self.patch_size)
            x = x_BNE.transpose(1, 2).reshape(B, E, nh, nw)
            feats.append(self.scratch.layer_rn[i](self.act_postprocess[i](x)))
        l1, l2, l3, l4 = feats
        path = self.scratch.refinenet4(l4, None, size=l3.shape[-2:])
        path = self.scratch.refinenet3(path, l3, size=l2.shape[-2:])
        path = self.scratch.refinenet2(path, l2, size=l1.shape[-2:])
        path = self.scratch.refinenet1(path, l1, size=(2 * l1.shape[-2], 2 * l1.shape[-1]))
        out = self.head(path)
        if tuple(out.shape[-2:]) != tuple(layout.image_size):
            out = F.interpolate(out, size=layout.image_size, mode="bilinear", align_corners=False)
        return out


class FinetuneModel(nn.Module):
    """The unmasked MultiMAE encoder (the original's MultiViT) plus one fine-tuning head: `forward(inputs) -> Tensor`.

    It owns `input_adapters`, `global_tokens`, `encoder` and `output_adapters[<name>]` directly, so its state dict has
    the original's fine-tuning keys and layer-wise lr decay (`training.optim.layer_id`) sees the names it expects.
    The encoder pass is `multimae.encode_unmasked`, the function `MultiMAE.encode` runs too.

    Args:
        input_adapters: modality -> input adapter, bound to the encoder width (any subset of modalities).
        encoder: the encoder blocks.
        global_tokens: `[1, G, E]` global tokens, appended after the patch tokens.
        head: an unbound head (`LinearOutputAdapter`, `ConvNeXtSegHead`, `DPTDepthHead`); bound here with
            `init(embed_dim=E)`.
        name: key of the head in `output_adapters` (the task: `cls`, `semseg`, `depth`).
    """

    def __init__(self, *, input_adapters: Mapping[str, nn.Module], encoder: nn.Sequential,
                 global_tokens: nn.Parameter, head: nn.Module, name: str) -> None:
        super().__init__()
        if not input_adapters:
            raise ValueError("FinetuneModel needs at least one input adapter")
        self.input_adapters = nn.ModuleDict(dict(input_adapters))
        self.global_tokens = global_tokens
        self.encoder = encoder
        self.embed_dim: int = global_tokens.shape[-1]
        self.depth = len(encoder)
        self.inputs: tuple[str, ...] = tuple(self.input_adapters)
        self.name = name
        head.init(embed_dim=self.embed_dim)
        hooks = getattr(head, "hooks", None)
        if hooks is not None and any(not 1 <= h <= self.depth for h in hooks):
            raise ValueError(f"head hooks {list(hooks)} must be encoder layers in 1..{self.depth}")
        self.output_adapters = nn.ModuleDict({name: head})

    @classmethod
    def from_multimae(cls, backbone: nn.Module, head: nn.Module, *, name: str) -> FinetuneModel:
        """Take over a MultiMAE's input adapters, encoder and global tokens (its decoders are dropped).

        The modules are moved, not copied: do not keep using `backbone` afterwards.
        """
        if not all(hasattr(backbone, a) for a in ("input_adapters", "encoder", "global_tokens")):
            raise TypeError(f"backbone must be a MultiMAE, got {type(backbone).__name__}")
        return cls(input_adapters=backbone.input_adapters, encoder=backbone.encoder,
                   global_tokens=backbone.global_tokens, head=head, name=name)

    @property
    def head(self) -> nn.Module:
        """The fine-tuning head."""
        return self.output_adapters[self.name]

    def layout(self, inputs: Mapping[str, Tensor]) -> TokenLayout:
        """Token layout of `inputs` as the encoder concatenates them (adapter order, global tokens last)."""
        counts = []
        for name in self.inputs:
            adapter = self.input_adapters[name]
            h, w = inputs[name].shape[-2:]
            counts.append((name, (h // adapter.P_H) * (w // adapter.P_W)))
        first = self.input_adapters[self.inputs[0]]
        h, w = inputs[self.inputs[0]].shape[-2:]
        return TokenLayout(tuple(counts), (h * first.stride_level, w * first.stride_level),
                           self.global_tokens.shape[1])

    def encode(self, inputs: Mapping[str, Tensor], *, return_layers: Sequence[int] | None = None,
               ) -> Tensor | list[Tensor]:
        """The unmasked encoder output `[B, N + G, E]` (or the `return_layers` block outputs), as `MultiMAE.encode`."""
        return encode_unmasked(self.input_adapters, self.encoder, self.global_tokens, inputs,
                               return_layers=return_layers)[0]

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Predict from a batch holding every input modality (other keys, e.g. targets, are ignored).

        Returns logits `[B, classes]` (cls), logits `[B, classes, H, W]` (semseg) or `[B, 1, H, W]` (depth).
        """
        missing = [m for m in self.inputs if m not in inputs]
        if missing:
            raise ValueError(f"inputs: the model reads {list(self.inputs)} but the batch lacks {missing} "
                             f"(got {sorted(inputs)})")
        feed = {m: inputs[m] for m in self.inputs}
        # DPT reads four intermediate blocks; the other heads read the last one.
        hooks = getattr(self.head, "hooks", None)
        tokens, layout = encode_unmasked(self.input_adapters, self.encoder, self.global_tokens, feed,
                                         return_layers=list(hooks) if hooks is not None else None)
        return self.head(tokens, layout)

    def no_weight_decay(self) -> set[str]:
        """Names the original's fine-tuning exempts from weight decay (global tokens, position/class tables)."""
        names = {"global_tokens"}
        for key, adapter in self.input_adapters.items():
            if hasattr(adapter, "no_weight_decay"):
                names |= {f"input_adapters.{key}.{n}" for n in adapter.no_weight_decay()}
        return names


@dataclass(frozen=True)
class EncoderLoadReport:
    """What `load_pretrained_encoder` did, for logging."""

    loaded: tuple[str, ...]
    """Model keys filled from the checkpoint."""
    resized: tuple[str, ...]
    """Position tables interpolated (bicubic) to the model's grid."""
    padded: tuple[str, ...]
    """Class embeddings padded with a zero row (the padding class)."""
    dropped: tuple[str, ...]
    """Checkpoint keys not used: decoders (`output_adapters.*`) and input adapters of modalities not fine-tuned on."""
    initialised: tuple[str, ...]
    """Model keys left at their fresh init: the head, and new input adapters when allowed."""


def _adapter_names(keys: Sequence[str]) -> set[str]:
    return {k.split(".")[1] for k in keys if k.startswith("input_adapters.") and k.count(".") >= 2}


def load_pretrained_encoder(model: nn.Module, state_dict: Mapping[str, Tensor], *, allow_new_inputs: bool = False,
                            source: str = "checkpoint") -> EncoderLoadReport:
    """Fill a fine-tuning model's encoder from a MultiMAE state dict (original key layout), strictly.

    As the original's fine-tuning scripts: decoders (`output_adapters.*`) are dropped, input-adapter position tables
    are resized with bicubic interpolation to the model's grid, and a semseg class embedding gains the zero padding
    row when the model has one. Input adapters of modalities the model does not read are dropped. Everything else
    must match in name and shape: an encoder of another depth or width, other global tokens, or a model input the
    checkpoint has no adapter for (unless `allow_new_inputs`, e.g. RGB-D fine-tuning from RGB-only MAE weights)
    raises a ValueError naming the keys.
    """
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{source} is not a state dict of tensors: '{key}' holds a {type(value).__name__}")
    own = model.state_dict()
    own_enc = [k for k in own if not k.startswith("output_adapters.")]
    head_keys = [k for k in own if k.startswith("output_adapters.")]
    ckpt = {k: v for k, v in state_dict.items() if not k.startswith("output_adapters.")}
    dropped = [k for k in state_dict if k.startswith("output_adapters.")]

    ckpt_inputs, model_inputs = _adapter_names(list(ckpt)), _adapter_names(own_enc)
    unused = sorted(ckpt_inputs - model_inputs)
    new = sorted(model_inputs - ckpt_inputs)
    if model_inputs and not (model_inputs & ckpt_inputs):
        raise ValueError(f"{source} has input adapters for {sorted(ckpt_inputs)} but the model reads "
                         f"{sorted(model_inputs)}: no modality in common")
    if new and not allow_new_inputs:
        raise ValueError(f"{source} has no input adapter for {new} (it has {sorted(ckpt_inputs)}); fine-tune on "
                         f"modalities it was trained with, or allow new inputs to start them from scratch")
    for key in list(ckpt):
        if key.startswith("input_adapters.") and key.split(".")[1] in unused:
            dropped.append(key)
            del ckpt[key]
    if unused:
        logger.info("%s: dropping input adapters %s not used for fine-tuning", source, unused)

    resized, padded, mismatched = [], [], []
    for key, value in ckpt.items():
        if key not in own or tuple(value.shape) == tuple(own[key].shape):
            continue
        target = own[key]
        if key.endswith(".pos_emb") and value.ndim == 4 and target.ndim == 4 and value.shape[:2] == target.shape[:2]:
            ckpt[key] = F.interpolate(value.float(), size=tuple(target.shape[-2:]), mode="bicubic",
                                      align_corners=False).to(value.dtype)
            resized.append(key)
        elif (key.endswith(".class_emb.weight") and value.ndim == 2 and value.shape[1] == target.shape[1]
              and value.shape[0] + 1 == target.shape[0]):
            # Fine-tuning with a padding class adds one embedding row; the original pads with zeros.
            ckpt[key] = torch.cat([value, value.new_zeros(1, value.shape[1])])
            padded.append(key)
        else:
            mismatched.append(f"{key}: {source} {tuple(value.shape)} vs model {tuple(target.shape)}")
    if mismatched:
        more = f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        raise ValueError(f"{source} does not fit the model's sizes: {'; '.join(mismatched[:5])}{more}")

    unexpected = sorted(set(ckpt) - set(own_enc))
    allowed_missing = {k for k in own_enc if k.startswith("input_adapters.") and k.split(".")[1] in new}
    missing = sorted(set(own_enc) - set(ckpt) - allowed_missing)
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"keys the model lacks: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if missing:
            parts.append(f"model keys it lacks: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        raise ValueError(f"{source} does not fit the model's encoder ({'; '.join(parts)})")

    result = model.load_state_dict(ckpt, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert set(result.missing_keys) == set(head_keys) | allowed_missing, result.missing_keys
    if new:
        logger.warning("%s: input adapters %s start from scratch (not in the checkpoint)", source, new)
    return EncoderLoadReport(loaded=tuple(sorted(ckpt)), resized=tuple(resized), padded=tuple(padded),
                             dropped=tuple(dropped), initialised=tuple(sorted(set(head_keys) | allowed_missing)))
