"""packvit's SigLIP2 as the vision tower of a transformers vision-language model (LFM2-VL).

    vlm = transformers.Lfm2VlForConditionalGeneration.from_pretrained(checkpoint)
    use_packed_vision_tower(vlm)         # the VLM's Siglip2VisionModel → PackedSiglip2VisionModel
    vlm.generate(**inputs, max_new_tokens=64)   # the VLM's own processor output, as before
    restore_vision_tower(vlm)            # transformers' tower back, with the weights as they are now

The packed tower is called as transformers' is, ``tower(pixel_values [B, N, p*p*C],
pixel_attention_mask [B, N], spatial_shapes [B, 2])``, on the padded batches the VLM's processor
makes. It packs each image's ``h * w`` real patches (the first rows of its padded row), runs
packvit's SigLIP2 on them with one attention segment per image, and returns a
``BaseModelOutputWithPooling`` in the padded layout: ``last_hidden_state [B, N, D]`` after the
final LayerNorm, ``pooler_output [B, D]`` when the tower has its MAP head, ``hidden_states`` on
request (the embeddings, then each block's output, ``[B, N, D]`` each). Padding rows are zeros;
transformers' tower leaves finite values there that depend on its attention kernel, and the VLMs
read only the real rows.

Host synchronisation: the grid of each image must be known on the host to build the pack. The
tower copies ``spatial_shapes`` and one agreement flag per image (the mask's ones are exactly the
first ``h * w`` rows) to the host in one transfer: one synchronisation per call when they are on
the GPU, none when they are on the host. transformers' tower synchronises once per image in 5.17
(``spatial_shapes[i].tolist()`` in its position resize), and from 5.24 at least at its two
``torch_compilable_check``s on device tensors; what the VLM does after its tower is its own.

Weights: the packed tower's parameters are the VLM's, the same ``Parameter`` objects, dtype and
device, except q, k and v of each block, which packvit fuses into one projection (moved there,
not copied: transformers' tower keeps empty meta-device placeholders for them while it is out).
``restore_vision_tower`` moves them back the same way. While the packed tower is in,
``vlm.state_dict()`` and ``vlm.save_pretrained`` still give transformers' names (q, k and v split
again, as copies) and ``vlm.load_state_dict`` takes them. Build the optimiser after the swap: the
fused projections are new parameters.

Which models: LFM2-VL (``Lfm2VlForConditionalGeneration``, transformers >= 4.57), whose
``vision_tower`` is a ``Siglip2VisionModel``; any module holding one ``Siglip2VisionModel`` the
same way is accepted. DINOv3 and AIMv2 towers are refused: no transformers model calls them as a
VLM tower on padded batches (docs/vlm.md lists what was checked).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .._optional import require
from ..checkpoint import rename_prefixes
from ..models.siglip2 import TRANSFORMERS_NAMES, Siglip2NaflexConfig, Siglip2NaflexPacking
from ..packing import PackedBatch, offsets_within_items, to_device

__all__ = ["TOWER_CLASSES", "PackedSiglip2VisionModel", "use_packed_vision_tower", "restore_vision_tower",
           "find_vision_tower", "padded_inputs"]

#: transformers' vision towers of packvit's families (class name → family); only SigLIP2's is replaced
TOWER_CLASSES = {"Siglip2VisionModel": "siglip2", "DINOv3ViTModel": "dinov3", "Aimv2VisionModel": "aimv2"}

def _transformers():
    return require("transformers", "align", "packvit's transformers integration")


def _transformers_names(state: dict[str, torch.Tensor], prefix: str, copy_parts: bool = False) -> dict[str, torch.Tensor]:
    """packvit's SigLIP2 state → transformers' ``Siglip2VisionModel`` names under ``prefix``
    (``"vision_model."`` in transformers 4). Each fused ``attn.qkv`` splits into q, k and v: views
    of it, or copies with ``copy_parts``; every other entry is passed on as it is."""
    split = {}
    for key, value in state.items():
        block, _, leaf = key.partition(".attn.qkv.")
        if leaf:
            for name, part in zip("qkv", value.chunk(3)):
                split[f"{block}.attn.{name}_proj.{leaf}"] = part.clone() if copy_parts else part
        else:
            split[key] = value
    return {prefix + key: value for key, value in rename_prefixes(split, TRANSFORMERS_NAMES, reverse=True).items()}


def _assign_parameters(module: nn.Module, tensors: dict[str, torch.Tensor], requires_grad: dict[str, bool]) -> None:
    """Sets every parameter of ``module`` to ``tensors[name]`` (a ``Parameter`` kept as it is, a
    tensor wrapped in a new one), with ``requires_grad[name]``; the names must be exactly its own."""
    own = {name for name, _ in module.named_parameters()}
    if own != tensors.keys():
        raise ValueError(
            f"the weights do not match {type(module).__name__}: missing {sorted(own - tensors.keys())[:4]}, "
            f"unexpected {sorted(tensors.keys() - own)[:4]}; this transformers release names the tower's weights "
            f"differently from what packvit's SigLIP2 map knows"
        )
    for name, tensor in tensors.items():
        path, _, leaf = name.rpartition(".")
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=False)
        setattr(module.get_submodule(path), leaf, tensor.requires_grad_(requires_grad[name]))


def _placeholder(parameter: torch.Tensor) -> nn.Parameter:
    """An empty meta-device parameter of ``parameter``'s shape, dtype and ``requires_grad``."""
    return nn.Parameter(torch.empty_like(parameter, device="meta"), requires_grad=parameter.requires_grad)


class PackedSiglip2VisionModel(nn.Module):
    """transformers' ``Siglip2VisionModel`` on packed sequences: the same call, inputs and outputs
    (module docstring), packvit's SigLIP2 inside (``self.model``, a ``Siglip2NaflexPacking``).

    Built by ``use_packed_vision_tower`` (or ``from_transformers(tower)``, which leaves ``tower``
    an empty shell until ``to_transformers()`` gives it its weights back). ``config`` is the
    original tower's configuration.
    """

    def __init__(self, model: Siglip2NaflexPacking, original: nn.Module, transformers_prefix: str):
        super().__init__()
        self.model = model
        self.config = original.config
        # transformers' tower, kept outside the module tree (its parameters are not this module's)
        self.__dict__["original"] = original
        self.transformers_prefix = transformers_prefix  # "vision_model." in transformers 4, else ""
        self.register_state_dict_post_hook(_state_dict_in_transformers_names)
        self.register_load_state_dict_pre_hook(_load_transformers_names)

    @classmethod
    def from_transformers(cls, tower: nn.Module) -> "PackedSiglip2VisionModel":
        """The packed tower of a transformers ``Siglip2VisionModel``, holding its weights."""
        transformers = _transformers()
        if not isinstance(tower, transformers.Siglip2VisionModel):
            raise ValueError(f"PackedSiglip2VisionModel replaces a transformers Siglip2VisionModel, got {type(tower).__name__}")
        config = tower.config
        if any(parameter.is_meta for parameter in tower.parameters()):
            raise ValueError("the tower's weights are not loaded (meta tensors: offloaded with a device_map, or never "
                             "loaded); load the VLM onto one device before replacing its tower")
        if getattr(config, "attention_dropout", 0.0):
            raise ValueError(
                f"the tower's config has attention_dropout={config.attention_dropout}, and packvit's blocks have no "
                f"dropout; set vlm.config.vision_config.attention_dropout = 0.0 (the published checkpoints' value)"
            )
        with torch.no_grad():  # the fused projections are new leaf tensors, not results of a graph
            theirs = dict(tower.named_parameters())
            prefix = "vision_model." if any(key.startswith("vision_model.") for key in theirs) else ""
            has_head = any(key.startswith(prefix + "head.") for key in theirs)
            packed_config = Siglip2NaflexConfig.from_dict(config.to_dict(), vision_use_head=has_head)
            with torch.device("meta"):
                model = Siglip2NaflexPacking(packed_config, device="meta")
            mapped = model.map_checkpoint(theirs)
        flags = {key: parameter.requires_grad for key, parameter in theirs.items()}
        own = {id(parameter) for parameter in theirs.values()}
        mapped_flags = {}
        for key, value in mapped.items():
            if id(value) in own:  # one of the tower's parameters, taken as it is
                mapped_flags[key] = value.requires_grad
                continue
            _, layer, _, _, leaf = key.split(".")  # blocks.{layer}.attn.qkv.{leaf}: q, k and v fused
            parts = {flags[f"{prefix}encoder.layers.{layer}.self_attn.{name}_proj.{leaf}"] for name in "qkv"}
            if len(parts) > 1:
                raise ValueError(
                    f"layer {layer} of the tower trains some of q_proj, k_proj and v_proj's {leaf}s and freezes the "
                    f"others; packvit fuses them into one projection: freeze or train all three"
                )
            mapped_flags[key] = parts.pop()
        if _transformers_names(mapped, prefix).keys() != theirs.keys():
            raise ValueError(
                f"{type(tower).__name__}'s weights do not map one to one onto packvit's SigLIP2 in transformers "
                f"{transformers.__version__}; the tower cannot be replaced"
            )
        _assign_parameters(model, mapped, mapped_flags)
        kept = {id(parameter) for parameter in model.parameters()}
        moved = {key: _placeholder(value) for key, value in theirs.items() if id(value) not in kept}
        _assign_parameters(tower, {**theirs, **moved}, flags)  # q, k, v now live fused in `model` alone
        packed = cls(model, tower, prefix)
        return packed.train(tower.training)

    def to_transformers(self) -> nn.Module:
        """transformers' tower with this tower's weights as they are now (q, k and v copied out of
        the fused projections, every other parameter the same object); this tower keeps meta
        placeholders for the fused projections and can no longer run."""
        if self.is_restored:
            raise RuntimeError("this packed tower was already turned back into transformers' tower")
        ours = dict(self.model.named_parameters())
        flags = {key: value.requires_grad for key, value in _transformers_names(ours, self.transformers_prefix).items()}
        with torch.no_grad():  # q, k and v: new leaf copies, not results of a graph
            theirs = _transformers_names(ours, self.transformers_prefix, copy_parts=True)
        _assign_parameters(self.original, theirs, flags)
        fused = {key: _placeholder(value) for key, value in ours.items() if ".attn.qkv." in key}
        _assign_parameters(self.model, {**ours, **fused}, {key: value.requires_grad for key, value in ours.items()})
        return self.original.train(self.training)

    @property
    def is_restored(self) -> bool:
        """Whether ``to_transformers`` has given the weights back (this tower then cannot run)."""
        return self.model.blocks[0].attn.qkv.weight.is_meta

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor, spatial_shapes: torch.Tensor,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        """``pixel_values [B, N, p*p*C]``, ``pixel_attention_mask [B, N]`` (1 on each image's first
        ``h * w`` rows), ``spatial_shapes [B, 2]`` (h, w in patches) → ``BaseModelOutputWithPooling``
        (or its tuple with ``return_dict=False``). Other keyword arguments are transformers' options
        for its own attention kernels, which the packed tower does not use."""
        if self.is_restored:
            raise RuntimeError("this packed tower gave its weights back (restore_vision_tower); call "
                               "use_packed_vision_tower(vlm) again to pack the tower")
        if output_attentions or (output_attentions is None and getattr(self.config, "output_attentions", False)):
            raise ValueError("the packed tower runs varlen attention and computes no attention probabilities; "
                             "restore_vision_tower(vlm) to get output_attentions from transformers' tower")
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        if return_dict is None:
            return_dict = bool(getattr(self.config, "return_dict", True))
        grid_thw, gather = self._pack_index(pixel_values, pixel_attention_mask, spatial_shapes)
        batch_size, max_patches = pixel_values.shape[:2]
        patches = pixel_values.reshape(batch_size * max_patches, -1).index_select(0, gather)  # [S, p*p*C]
        every_layer = list(range(self.model.num_hidden_layers + 1)) if output_hidden_states else None
        out = self.model(PackedBatch(patches, grid_thw), hidden_layers=every_layer)
        scatter = gather if gather.device == out.last_hidden_state.device else gather.to(out.last_hidden_state.device)

        def padded(x: torch.Tensor) -> torch.Tensor:  # [S, D] → [B, N, D], zeros in the padding rows
            return x.new_zeros(batch_size * max_patches, x.shape[-1]).index_copy(0, scatter, x).view(
                batch_size, max_patches, -1)

        output = _transformers().modeling_outputs.BaseModelOutputWithPooling(
            last_hidden_state=padded(out.last_hidden_state),
            pooler_output=out.pooler_output,
            hidden_states=tuple(padded(h) for h in out.hidden_states) if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()

    def _pack_index(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor,
                    spatial_shapes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pack's host ``grid_thw [B, 3]`` and the rows of ``pixel_values.view(B * N, -1)`` that
        hold real patches (``[S]``, on ``pixel_values``' device), read with one host transfer."""
        patch_dim = self.model.patch_dim
        if pixel_values.dim() != 3 or pixel_values.shape[-1] != patch_dim:
            raise ValueError(
                f"pixel_values must be [batch, max_num_patches, {patch_dim}] (patches flattened by the VLM's processor), "
                f"got {tuple(pixel_values.shape)}"
            )
        batch_size, max_patches = pixel_values.shape[:2]
        if tuple(pixel_attention_mask.shape) != (batch_size, max_patches):
            raise ValueError(f"pixel_attention_mask must be [{batch_size}, {max_patches}] like pixel_values' first two "
                             f"dimensions, got {tuple(pixel_attention_mask.shape)}")
        if tuple(spatial_shapes.shape) != (batch_size, 2):
            raise ValueError(f"spatial_shapes must be [{batch_size}, 2] (h, w in patches per image), got "
                             f"{tuple(spatial_shapes.shape)}")
        device = pixel_attention_mask.device
        shapes = spatial_shapes.to(device, torch.int64)
        first_rows = torch.arange(max_patches, device=device) < shapes.prod(-1, keepdim=True)  # [B, N]
        agrees = ((pixel_attention_mask != 0) == first_rows).all(-1, keepdim=True)  # [B, 1]
        host = torch.cat([shapes, agrees.long()], dim=-1).cpu().numpy()  # [B, 3]: the one host transfer
        heights, widths, agree = host.T
        counts = heights * widths
        if (heights < 1).any() or (widths < 1).any() or (counts > max_patches).any():
            i = int(np.argmax((heights < 1) | (widths < 1) | (counts > max_patches)))
            raise ValueError(
                f"image {i} has spatial_shapes {host[i, :2].tolist()}, which is not a grid of 1 to {max_patches} "
                f"patches (the padded length of pixel_values); pass the processor's spatial_shapes"
            )
        if not agree.all():
            i = int(np.argmin(agree))
            raise ValueError(
                f"image {i}'s pixel_attention_mask does not mark exactly its first {counts[i]} rows (h * w = "
                f"{heights[i]} * {widths[i]} from spatial_shapes) as patches; the packed tower reads an image's "
                f"patches from those rows: pass the processor's mask and spatial_shapes together"
            )
        rows = np.repeat(np.arange(batch_size) * max_patches, counts) + offsets_within_items(counts)  # [S]
        grid_thw = torch.from_numpy(np.stack([np.ones_like(heights), heights, widths], axis=-1))
        return grid_thw, to_device(torch.from_numpy(rows), pixel_values.device)


def _state_dict_in_transformers_names(module: PackedSiglip2VisionModel, state_dict: dict, prefix: str,
                                      local_metadata) -> None:
    """``state_dict`` post-hook: the packed tower's entries under transformers' names (q, k and v as
    copies of their parts of the fused projections, so that no two entries share memory)."""
    inner = prefix + "model."
    ours = {key[len(inner):]: state_dict.pop(key) for key in [key for key in state_dict if key.startswith(inner)]}
    for key, value in _transformers_names(ours, module.transformers_prefix, copy_parts=True).items():
        state_dict[prefix + key] = value


def _load_transformers_names(module: PackedSiglip2VisionModel, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: entries under transformers' names become packvit's."""
    inner = prefix + "model."
    keys = [key for key in state_dict if key.startswith(prefix) and not key.startswith(inner)]
    theirs = {key[len(prefix):]: state_dict.pop(key) for key in keys}
    for key, value in module.model.map_checkpoint(theirs).items():
        state_dict[inner + key] = value


def padded_inputs(batch: PackedBatch, max_num_patches: int | None = None) -> dict[str, torch.Tensor]:
    """A packed batch of images in the padded format of transformers' SigLIP2 processors (LFM2-VL's
    too): ``pixel_values [B, max_num_patches, p*p*C]`` (each image's patches in its first rows, zeros
    after), ``pixel_attention_mask [B, max_num_patches]`` (int32) and ``spatial_shapes [B, 2]``
    (int64 h, w). ``max_num_patches``: the padded length (LFM2-VL's processor pads to 1024 at its
    defaults); ``None``: the largest image's patch count."""
    if batch.patch_layout != "ppc":
        raise ValueError(f"transformers' SigLIP2 processors flatten patches (p, p, C), the batch is {batch.patch_layout!r}; "
                         f"build it with packvit's SigLIP2 processor")
    if (batch.grid_thw[:, 0] != 1).any():
        raise ValueError("the padded format holds images (t = 1); split clips with batch.frames_as_items()")
    counts = np.asarray(batch.token_counts)
    if max_num_patches is None:
        max_num_patches = int(counts.max())
    if counts.max() > max_num_patches:
        raise ValueError(f"an image of the batch has {counts.max()} patches, more than max_num_patches={max_num_patches}; "
                         f"pass a larger max_num_patches or process the images to fewer patches")
    rows = np.repeat(np.arange(batch.num_items) * max_num_patches, counts) + offsets_within_items(counts)  # [S]
    rows = torch.from_numpy(rows).to(batch.patches.device)
    pixel_values = batch.patches.new_zeros(batch.num_items * max_num_patches, batch.patch_dim)
    pixel_values.index_copy_(0, rows, batch.patches)
    mask = torch.zeros(batch.num_items * max_num_patches, dtype=torch.int32, device=batch.patches.device)
    mask[rows] = 1
    return {"pixel_values": pixel_values.view(batch.num_items, max_num_patches, -1),
            "pixel_attention_mask": mask.view(batch.num_items, max_num_patches),
            "spatial_shapes": batch.grid_thw[:, 1:].clone()}


def find_vision_tower(vlm: nn.Module) -> tuple[str, nn.Module]:
    """``(qualified name, module)`` of the one vision tower of a packvit family in ``vlm`` (a
    transformers tower or a packed one); ``ValueError`` naming what was found otherwise."""
    transformers = _transformers()
    classes = tuple(getattr(transformers, name) for name in TOWER_CLASSES if hasattr(transformers, name))
    found, outer = [], None
    for name, module in vlm.named_modules():
        if outer is not None and name.startswith(outer + "."):
            continue  # inside a tower already found
        if isinstance(module, classes + (PackedSiglip2VisionModel,)):
            found.append((name, module))
            outer = name
    if not found:
        towers = [f"{name} ({type(module).__name__})" for name, module in vlm.named_modules()
                  if name.rpartition(".")[2] in ("vision_tower", "vision_model", "visual")]
        seen = f"; its vision modules are {', '.join(towers)}" if towers else ""
        raise ValueError(
            f"{type(vlm).__name__} holds no transformers vision tower of a packvit family ({', '.join(TOWER_CLASSES)})"
            f"{seen}. packvit replaces a Siglip2VisionModel tower, e.g. LFM2-VL's (Lfm2VlForConditionalGeneration)"
        )
    if len(found) > 1:
        raise ValueError(f"{type(vlm).__name__} holds {len(found)} vision towers ({', '.join(n for n, _ in found)}); "
                         f"pass the module that holds the one to replace")
    return found[0]


def _set_submodule(vlm: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, attribute = name.rpartition(".")
    setattr(vlm.get_submodule(owner), attribute, module)


def use_packed_vision_tower(vlm: nn.Module) -> PackedSiglip2VisionModel:
    """Replaces the SigLIP2 vision tower of ``vlm`` (LFM2-VL's ``model.vision_tower``) by packvit's,
    in place, with the same weights; returns the packed tower. ``restore_vision_tower(vlm)`` undoes it."""
    name, tower = find_vision_tower(vlm)
    if isinstance(tower, PackedSiglip2VisionModel):
        raise ValueError(f"{name} is packvit's packed tower already")
    family = TOWER_CLASSES[type(tower).__name__] if type(tower).__name__ in TOWER_CLASSES else None
    if family != "siglip2":
        raise ValueError(
            f"{name} is a {type(tower).__name__}; packvit replaces SigLIP2 NaFlex towers (Siglip2VisionModel) only. "
            f"No transformers VLM calls a DINOv3 or AIMv2 tower on padded batches; encode such images with "
            f"packvit.from_pretrained(...) and packvit.vlm.VisionTower instead"
        )
    if not name:
        raise ValueError("pass the vision-language model that holds the tower, not the tower itself; "
                         "PackedSiglip2VisionModel.from_transformers(tower) converts a tower on its own")
    packed = PackedSiglip2VisionModel.from_transformers(tower)
    _set_submodule(vlm, name, packed)
    return packed


def restore_vision_tower(vlm: nn.Module) -> nn.Module:
    """Puts transformers' tower back into ``vlm`` in place of packvit's, with the weights as they
    are now (trained or not); returns it."""
    name, tower = find_vision_tower(vlm)
    if not isinstance(tower, PackedSiglip2VisionModel):
        raise ValueError(f"{name} is transformers' {type(tower).__name__}: there is no packed tower to restore")
    original = tower.to_transformers()
    _set_submodule(vlm, name, original)
    return original
