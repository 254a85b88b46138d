"""ldm.data: WebDataset shards -> batch dicts (the shared contract), and the tools that write shards.

- `datamodule.ShardDataModule`  the LightningDataModule behind conf/data/*.yaml
- `pipeline`                    decoding, crops and batching inside loader workers (`ShardStream`)
- `loader.ResumableLoader`      the DataLoader wrapper that resumes mid-epoch exactly
- `shards`                      shard specs, manifests, rank/worker splitting, seeds
- `transforms`, `masks`, `degradations`   image ops and task transforms (conf/data/task/*.yaml)
- `make_shards`, `cache_latents`          `python -m ldm.data.<tool> --help`
"""
