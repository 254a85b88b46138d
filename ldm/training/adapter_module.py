"""Training where only a small adapter learns (LoRA, textual inversion) on top of a frozen base file.

The base weights come from `base_model` every time the run is built (start and resume), so checkpoints hold
only the adapter: its trainable tensors, their EMA and the optimizer state — megabytes instead of gigabytes.
At the end the adapter is written in the formats other tools load (`export_adapter`), not a whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from ldm.training.finetune import FineTuneModule


class AdapterModule(FineTuneModule):
    """A FineTuneModule whose checkpoints and export hold only the trainable (adapter) tensors."""

    strict_loading = False  # Lightning: a checkpoint holds the adapter only; `on_load_checkpoint` checks it

    def checkpoint_keys(self) -> dict[str, Tensor]:
        """State entries of the trainable parameters (`model.*`) and their EMA (`ema.*`)."""
        trainable = {"model." + n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in trainable or k.startswith("ema.")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        keep = set(self.checkpoint_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def export_config(self, config: dict) -> dict:
        return {**super().export_config(config), "adapter": self.adapter_summary()}

    def adapter_summary(self) -> dict[str, Any]:
        """What the adapter is (kind, sizes): recorded in the run config and the exported files."""
        raise NotImplementedError

    def export_adapter(self, folder: Path, run_config: dict | None) -> list[Path]:
        """Write the adapter files into `folder` (rank zero); returns their paths."""
        raise NotImplementedError
