"""Shared fixtures: CPU-only, tiny, offline."""

import os
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_ae, tiny_data  # noqa: F401  (session fixtures for the train.py tests)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tiny models gain nothing from intra-op threads, and several threads per process oversubscribe the
# 2-core CI machine (multi-process DDP tests especially): one thread is the fastest setting here.
torch.set_num_threads(int(os.environ.get("LDM_TEST_THREADS", "1")))

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The CompVis golden outputs in ../shared/reference (skipped with a reason when absent)."""
    if not (REFERENCE_DIR / "sd_v1_tiny.safetensors").is_file():
        pytest.skip(f"CompVis reference outputs not found at {REFERENCE_DIR} (see its README)")
    return REFERENCE_DIR


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
    """Drop logging handlers bound to streams an earlier test's capture closed (in-process Hydra runs
    attach handlers to the sys.stderr of their time); writing to them prints '--- Logging error ---'."""
    import logging

    loggers = [
        logging.getLogger(),
        *(v for v in logging.Logger.manager.loggerDict.values() if hasattr(v, "handlers")),
    ]
    for logger in loggers:
        for handler in list(logger.handlers):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)
    yield


@pytest.fixture(scope="session")
def sd_base(reference_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(tiny SD v1 file in the original layout, its yaml, CLIP tokenizer folder): tests/sd_fixtures.py."""
    from sd_fixtures import build_sd_base

    return build_sd_base(tmp_path_factory.mktemp("sd_base"), reference_dir)
