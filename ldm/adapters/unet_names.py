"""Module paths of our UNet (CompVis `UNetModel` layout) in diffusers' `UNet2DConditionModel` naming.

    input_blocks.0.0                         conv_in
    input_blocks.{i}.0 (ResBlock)            down_blocks.{level}.resnets.{k}     i = 1 + level*(n+1) + k, k<n
    input_blocks.{i}.1 (SpatialTransformer)  down_blocks.{level}.attentions.{k}
    input_blocks.{i}.0 (Downsample)          down_blocks.{level}.downsamplers.0  k = n
    middle_block.0 / .1 / .2                 mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{i}.0 (ResBlock)           up_blocks.{level}.resnets.{k}       i = level*(n+1) + k
    output_blocks.{i}.1 (SpatialTransformer) up_blocks.{level}.attentions.{k}
    output_blocks.{i}.{1|2} (Upsample)       up_blocks.{level}.upsamplers.0
    time_embed.0 / .2                        time_embedding.linear_1 / linear_2
    out.0 / .2, label_emb                    conv_norm_out / conv_out, class_embedding

with n = num_res_blocks; inside a ResBlock in_layers.0/.2, emb_layers.1, out_layers.0/.3, skip_connection are
norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut; Downsample.op and Upsample.conv are `conv`;
everything inside a SpatialTransformer (proj_in, transformer_blocks.N.attn1.to_q, ff.net.0.proj, ...) keeps
its name. The down_blocks index is the UNet level; diffusers counts the up_blocks from the deepest level.

Why our own table rather than diffusers' `convert_ldm_unet_checkpoint`: diffusers is an optional extra
(`pip install 'ldm[diffusers]'`) and LoRA files must be written and read without it; its converter renames the
*weights* of a complete UNet state dict (it needs every key and a diffusers config), not the module paths of
the few layers a LoRA adapts; and keeping CompVis paths as the source of truth is what lets the older
AUTOMATIC1111 files named by CompVis keys (`lora_unet_input_blocks_1_1_...`) load. tests/test_lora_files.py
checks the table against diffusers' converter (tiny SD: names and values; full-size SD 1.x and 2.x: names).
"""

from __future__ import annotations

from torch import nn

from ldm.errors import UserError

RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
RESAMPLE = {"op": "conv", "conv": "conv"}  # Downsample.op / Upsample.conv
TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb": "class_embedding",
}
ATTENTION_BLOCK_CHILDREN = ("qkv",)  # the LDM paper's AttentionBlock: diffusers splits qkv, no 1:1 module


def _child(rest: list[str]) -> str | None:
    """diffusers name of a path inside a ResBlock (the part after the block), None for another path."""
    tail = ".".join(rest)
    for ours, theirs in RESBLOCK.items():
        if tail == ours or tail.startswith(ours + "."):
            return theirs + tail[len(ours) :]
    return None


def _resnet_or_resampler(prefix: str, rest: list[str]) -> str | None:
    """A ResBlock (resnets.k / a resblock_updown resampler) or Downsample/Upsample under `prefix`."""
    if rest and rest[0] in RESAMPLE and len(rest) == 1:
        return f"{prefix}.{RESAMPLE[rest[0]]}"
    named = _child(rest)
    return f"{prefix}.{named}" if named is not None else None


def _join(prefix: str, rest: list[str]) -> str:
    return ".".join([prefix, *rest])


def _is_resampler(rest: list[str]) -> bool:
    """Whether the child path `rest` of a block's second/third child is an Upsample (or an up-ResBlock)."""
    return bool(rest) and (rest[0] == "conv" or any(rest[0] == k.split(".")[0] for k in RESBLOCK))


def diffusers_path(path: str, num_res_blocks: int) -> str | None:
    """The diffusers `UNet2DConditionModel` module path of our UNet module `path` (relative to the UNet).

    `num_res_blocks`: ResBlocks per level on the way down (SD 1.x/2.x: 2), the one number the block indices
    depend on. None for a path with no diffusers counterpart (the LDM paper's AttentionBlock qkv, a block
    container). Pure path arithmetic: no model and no diffusers needed."""
    n = int(num_res_blocks)
    for ours, theirs in TOP.items():
        if path == ours or path.startswith(ours + "."):
            return theirs + path[len(ours) :]
    parts = path.split(".")
    if any(p in ATTENTION_BLOCK_CHILDREN for p in parts):
        return None
    if parts[0] == "middle_block":
        if len(parts) < 3 or not parts[1].isdigit():
            return None
        j, rest = int(parts[1]), parts[2:]
        if j == 1:
            return _join("mid_block.attentions.0", rest)
        if j in (0, 2):
            return _resnet_or_resampler(f"mid_block.resnets.{j // 2}", rest)
        return None
    if len(parts) < 4 or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    i, j, rest = int(parts[1]), int(parts[2]), parts[3:]
    if parts[0] == "input_blocks" and i > 0:
        level, k = divmod(i - 1, n + 1)
        if k == n:
            return _resnet_or_resampler(f"down_blocks.{level}.downsamplers.0", rest) if j == 0 else None
        if j == 0:
            return _resnet_or_resampler(f"down_blocks.{level}.resnets.{k}", rest)
        return _join(f"down_blocks.{level}.attentions.{k}", rest) if j == 1 else None
    if parts[0] == "output_blocks":
        level, k = divmod(i, n + 1)
        if j == 0:
            return _resnet_or_resampler(f"up_blocks.{level}.resnets.{k}", rest)
        if _is_resampler(rest):
            return _resnet_or_resampler(f"up_blocks.{level}.upsamplers.0", rest)
        return _join(f"up_blocks.{level}.attentions.{k}", rest) if j == 1 else None
    return None


def num_res_blocks(unet: nn.Module) -> int:
    """ResBlocks per level on the way down, read off a built UNet's structure (levels = 1 + resamplers).

    Raises UserError for a module that is not our CompVis-layout UNetModel."""
    inputs, outputs = getattr(unet, "input_blocks", None), getattr(unet, "output_blocks", None)
    if inputs is None or outputs is None:
        raise UserError(
            f"{type(unet).__name__} is not a CompVis-layout UNet (no input_blocks/output_blocks)."
        )

    def resamples(block: nn.Module) -> bool:
        first = next(iter(block.children()), None)
        return type(first).__name__ == "Downsample" or bool(getattr(first, "updown", False))

    levels = 1 + sum(resamples(b) for b in list(inputs)[1:])
    n, rem = divmod(len(outputs), levels)
    if rem or len(inputs) != 1 + levels * (n - 1) + levels - 1:
        raise UserError(
            f"the UNet has {len(inputs)} input and {len(outputs)} output blocks for {levels} levels: not the "
            "CompVis layout (num_res_blocks per level + one resampler between levels)."
        )
    return n - 1


def unet_module_map(unet: nn.Module) -> dict[str, str]:
    """{our module path: diffusers module path} for every UNet module that holds parameters directly.

    Modules with no diffusers counterpart (AttentionBlock of the LDM paper's non-text models) are left out.
    A peft-wrapped UNet gives the plain layers' paths (`.base_layer` dropped, the LoRA layers skipped)."""
    n = num_res_blocks(unet)
    out: dict[str, str] = {}
    skip = tuple(n + "." for n, m in unet.named_modules() if type(m).__name__ == "AttentionBlock")
    for name, module in unet.named_modules():
        if not any(True for _ in module.parameters(recurse=False)) or ".lora_" in name:
            continue
        if skip and name.startswith(skip):
            continue
        plain = name.replace(".base_layer", "")
        theirs = diffusers_path(plain, n)
        if theirs is not None:
            out[plain] = theirs
    return out


__all__ = ["diffusers_path", "num_res_blocks", "unet_module_map"]
