"""A redirected log gets plain progress lines (step, loss, it/s), not tqdm's carriage returns."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel

from ldm.training.callbacks import StepProgressBar


class LoggingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"], prog_bar=True)
        return out


def test_plain_mode_logs_every_n_steps_and_the_last(caplog, capsys):
    bar = StepProgressBar(plain=True, log_every=4)
    trainer = pl.Trainer(
        max_steps=10, callbacks=[bar], logger=False, enable_checkpointing=False, enable_model_summary=False,
        limit_val_batches=0, accelerator="cpu",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="ldm.training.callbacks"):
        trainer.fit(LoggingModel())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]
    assert all("train/loss" in line and "it/s" in line for line in lines)
    assert "\r" not in capsys.readouterr().err  # no bar frames at all
