"""ldm.data: WebDataset shards -> batch dicts (the shared contract), and the tools that write shards.

- `datamodule.ShardDataModule`  the LightningDataModule behind conf/data/*.yaml
- `pipeline`                    decoding, crops and batching inside loader workers (`ShardStream`)
- `images`, `text`              the one image decoder (EXIF, alpha on white, masks, segmaps) and the
                                one text decoder (UTF-8, else cp1252 with a warning), used everywhere
- `loader.ResumableLoader`      the DataLoader wrapper that resumes mid-epoch exactly
- `shards`                      shard specs, manifests, rank/worker splitting, seeds, tar reading
- `transforms`, `masks`, `degradations`   image ops and task transforms (conf/data/task/*.yaml)
- `make_shards`, `cache_latents`          `python -m ldm.data.<tool> --help`
"""
