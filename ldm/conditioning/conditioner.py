"""One container that turns a batch (or raw user inputs) into the UNet's conditioning kwargs.

After Stability-AI/generative-models' `GeneralConditioner`: a list of conditioners, each reading its
own batch keys; outputs are grouped by kind into

    {"context": (B, L, D) | None,   # cross-attention outputs, concatenated along L
     "concat":  (B, C, h, w) | None,  # spatial outputs, concatenated along C (UNet in = latent + C)
     "y":       (B,) | (B, D) | None}  # the single "class" output

Classifier-free guidance (Ho & Salimans 2022): in training each conditioner's output is replaced by its
null value per sample with probability `dropout`. For the unconditional branch at sampling time,
cross-attention and class outputs become their null values; concat outputs are *kept* by default, as
CompVis/SD-inpainting and LDM-SR do (guidance then pushes towards the prompt, not away from the
image being inpainted/upscaled). Set `uncond_keeps_concat=False` to use their null values instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ldm.conditioning.base import BaseConditioner, EncodeFn, drop_mask
from ldm.errors import UserError

KWARG_OF_OUTPUT = {"crossattn": "context", "concat": "concat", "class": "y"}


def _describe(name: str, c: BaseConditioner) -> str:
    return f"'{name}' ({type(c).__name__} reading {', '.join(c.input_keys)})"


class Conditioner(nn.Module):
    """Conditioners by name -> UNet kwargs {context, concat, y}; per-key dropout; null conditioning."""

    def __init__(
        self,
        conditioners: Sequence[BaseConditioner] | Mapping[str, BaseConditioner] = (),
        uncond_keeps_concat: bool = True,  # CompVis keeps masked/low-res images in the uncond branch
    ) -> None:
        super().__init__()
        items = conditioners.items() if isinstance(conditioners, Mapping) else enumerate(conditioners)
        self.conditioners = nn.ModuleDict()
        for name, c in items:
            if c is None:  # a config can switch an entry off with `conditioners.<name>: null`
                continue
            if not isinstance(c, BaseConditioner):
                raise UserError(
                    f"Conditioner entry '{name}' is a {type(c).__name__}, not a conditioner; give each "
                    "entry a _target_ from ldm.conditioning (e.g. ldm.conditioning.FrozenTextEncoder)."
                )
            self.conditioners[str(name)] = c
        self.uncond_keeps_concat = bool(uncond_keeps_concat)
        self._encode_fn: EncodeFn | None = None
        dims = {n: c.out_dim for n, c in self._of("crossattn")}
        if len(set(dims.values())) > 1:
            listing = ", ".join(f"{_describe(n, self.conditioners[n])}: {d}" for n, d in dims.items())
            raise UserError(
                f"Cross-attention conditioners are joined along the sequence, so they need one width D, "
                f"but got {listing}; give them the same embed dim."
            )
        classes = [n for n, _ in self._of("class")]
        if len(classes) > 1:
            raise UserError(f"Only one conditioner may feed the UNet's class input y, got {classes}.")

    def _of(self, output: str) -> Iterator[tuple[str, BaseConditioner]]:
        return ((n, c) for n, c in self.conditioners.items() if c.output == output)

    # What the UNet must match -------------------------------------------------------------------------

    @property
    def context_dim(self) -> int | None:
        """D of the cross-attention context, or None when no conditioner produces one."""
        return next((c.out_dim for _, c in self._of("crossattn")), None)

    @property
    def concat_channels(self) -> int:
        """Channels concatenated to the latent: the UNet needs in_channels = latent channels + this."""
        return sum(c.out_dim for _, c in self._of("concat"))

    @property
    def num_classes(self) -> int | None:
        """The UNet's `num_classes` for a class-id `y`: the real classes + 1 null class (None: no ids)."""
        c = next((c for _, c in self._of("class")), None)
        if c is None or c.out_dim is not None:
            return None
        return c.n_classes + 1

    @property
    def input_keys(self) -> tuple[str, ...]:
        """Every batch key some conditioner reads."""
        return tuple(dict.fromkeys(k for c in self.conditioners.values() for k in c.input_keys))

    def check_unet(
        self,
        *,
        context_dim: int | None,
        in_channels: int,
        latent_channels: int,
        num_classes: int | None = None,
        where: str = "model.unet",
    ) -> None:
        """Raise a UserError naming both numbers when the UNet's config does not fit these conditioners."""
        if context_dim != self.context_dim:
            ours = self.context_dim if self.context_dim is not None else "no context (None)"
            raise UserError(
                f"{where}.context_dim is {context_dim} but the conditioner produces {ours}; set "
                f"{where}.context_dim: {self.context_dim if self.context_dim is not None else 'null'}."
            )
        expected_in = latent_channels + self.concat_channels
        if in_channels != expected_in:
            raise UserError(
                f"{where}.in_channels is {in_channels} but the UNet input is {latent_channels} latent + "
                f"{self.concat_channels} concat channels = {expected_in}; "
                f"set {where}.in_channels: {expected_in}."
            )
        if num_classes != self.num_classes:
            raise UserError(
                f"{where}.num_classes is {num_classes} but the conditioner needs {self.num_classes} "
                "(n_classes + 1 for the null class of guidance, or null without class ids); set "
                f"{where}.num_classes: {self.num_classes if self.num_classes is not None else 'null'}."
            )

    # Training and sampling ----------------------------------------------------------------------------

    def set_encode_fn(self, encode_fn: EncodeFn | None) -> None:
        """Remember the frozen autoencoder's pixels -> scaled latents (not a submodule, never saved)."""
        self._encode_fn = encode_fn

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy (EMA) and pickling must not drag the autoencoder along through the bound method.
        state = self.__dict__.copy()
        state["_encode_fn"] = None
        return state

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the trainable conditioners (frozen text encoders are left out of the optimizer)."""
        return [
            p for c in self.conditioners.values() if c.trainable for p in c.parameters() if p.requires_grad
        ]

    def forward(
        self,
        batch: Mapping[str, Any],
        *,
        train: bool,
        generator: torch.Generator | None = None,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> dict[str, Tensor | None]:
        """UNet kwargs for a batch; with train=True each conditioner's output is dropped to null w.p. dropout.

        The drop masks are drawn in container order, one `torch.rand(B, generator=generator)` per
        conditioner with 0 < dropout, on the generator's device (CPU when None).
        """
        kw = {"encode_fn": encode_fn or self._encode_fn, "latent_size": latent_size}
        outputs = {}
        for name, c in self.conditioners.items():
            out = c(batch, **kw)
            if train and c.dropout > 0:
                dropped = drop_mask(out.shape[0], c.dropout, generator, out.device)
                if bool(dropped.any()):
                    null = c.null(batch, **kw).to(out)
                    out = torch.where(dropped.view(-1, *([1] * (out.ndim - 1))), null, out)
            outputs[name] = out
        return self._assemble(outputs)

    def null_conditioning(
        self,
        batch: Mapping[str, Any],
        *,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> dict[str, Tensor | None]:
        """Unconditional UNet kwargs for guidance (concat outputs kept unless uncond_keeps_concat=False)."""
        kw = {"encode_fn": encode_fn or self._encode_fn, "latent_size": latent_size}
        outputs = {}
        for name, c in self.conditioners.items():
            keep = c.output == "concat" and self.uncond_keeps_concat
            outputs[name] = c(batch, **kw) if keep else c.null(batch, **kw)
        return self._assemble(outputs)

    def encode(
        self,
        inputs: Mapping[str, Any],
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> dict[str, Tensor | None]:
        """UNet kwargs for raw user inputs (prompt strings, label ids, (C,H,W) images, (H,W) maps)."""
        return self.encode_with_null(
            inputs,
            batch_size=batch_size,
            device=device,
            encode_fn=encode_fn,
            latent_size=latent_size,
            null=False,
        )[0]

    @torch.no_grad()
    def encode_with_null(
        self,
        inputs: Mapping[str, Any],
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        encode_fn: EncodeFn | None = None,
        latent_size: tuple[int, int] | None = None,
        null: bool = True,
    ) -> tuple[dict[str, Tensor | None], dict[str, Tensor | None] | None]:
        """(conditional, unconditional) UNet kwargs for sampling; concat outputs are encoded only once.

        `batch_size` repeats single inputs (one prompt for n images); `device` defaults to the
        conditioners' own device.
        """
        batch = self.prepare(inputs, device=device)
        kw = {"encode_fn": encode_fn or self._encode_fn, "latent_size": latent_size}
        cond, uncond = {}, {}
        for name, c in self.conditioners.items():
            cond[name] = c(batch, **kw)
            if null:
                keep = c.output == "concat" and self.uncond_keeps_concat
                uncond[name] = cond[name] if keep else c.null(batch, **kw)
        cond_kwargs = self._assemble(cond, batch_size)
        return cond_kwargs, (self._assemble(uncond, batch_size) if null else None)

    def prepare(self, inputs: Mapping[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
        """Raw user inputs -> batch form, tensors moved to `device` (default: the conditioners' device)."""
        if device is None:
            tensor = next(iter(self.parameters()), None)
            tensor = tensor if tensor is not None else next(iter(self.buffers()), None)
            device = tensor.device if tensor is not None else None
        batch = dict(inputs)
        for c in self.conditioners.values():
            batch.update(c.prepare(batch))
        if device is not None:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        return batch

    def _assemble(
        self, outputs: dict[str, Tensor], batch_size: int | None = None
    ) -> dict[str, Tensor | None]:
        """Group per-conditioner outputs into UNet kwargs, checking (and optionally broadcasting) B."""
        sizes = {n: out.shape[0] for n, out in outputs.items()}
        target = batch_size if batch_size is not None else max(sizes.values(), default=None)
        for n in sizes.values():
            if n != target and not (n == 1 and batch_size is not None):
                listing = ", ".join(f"{_describe(k, self.conditioners[k])}: {v}" for k, v in sizes.items())
                raise UserError(
                    f"Conditioning inputs disagree on the batch size ({listing}); give each the same."
                )
        kwargs: dict[str, Tensor | None] = {}
        for output, kwarg in KWARG_OF_OUTPUT.items():
            parts = [outputs[n] for n, _ in self._of(output)]
            parts = [p.expand(target, *p.shape[1:]) if p.shape[0] != target else p for p in parts]
            kwargs[kwarg] = torch.cat(parts, dim=1) if len(parts) > 1 else (parts[0] if parts else None)
        return kwargs
