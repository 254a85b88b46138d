"""Write the golden files of the LDM paper's class-conditional and BERT text-to-image families.

    tests/goldens/ldm_cin256/        ClassEmbedder (1000 classes + null id 1000) -> cross-attention, VQ f=2
    tests/goldens/ldm_txt2img_1p4b/  BERTEmbedder (x-transformers Encoder, WordPiece) -> crossattn, KL f=2

Each folder gets `config.yaml` (a tiny copy of the original inference yaml: same targets and structure),
`model.safetensors` (the original LatentDiffusion's whole state_dict, every tensor perturbed) and
`io.safetensors` (inputs and what the original code returns for them; keys in tests/goldens/README.md).
The text family also gets `vocab/vocab.txt`, a tiny WordPiece vocabulary standing in for bert-base-uncased.

This script imports the ORIGINAL CompVis latent-diffusion code, which is not part of this repository.
Run it from a separate virtual environment (never this project's: both packages are called `ldm`):

    python3 -m venv /tmp/venv_orig && /tmp/venv_orig/bin/pip install torch einops omegaconf numpy \
        transformers safetensors tqdm pillow
    /tmp/venv_orig/bin/pip install --no-deps taming-transformers-rom1504
    PYTHONPATH=/path/to/CompVis/latent-diffusion /tmp/venv_orig/bin/python tests/goldens/make_ldm_cond.py

Modules the original imports but these models never run (pytorch_lightning, torchvision, clip, kornia) are
replaced by empty stand-ins below; `BertTokenizerFast.from_pretrained("bert-base-uncased")` is redirected
to the local vocab, and `DDIMSampler.register_buffer` keeps tensors on the CPU (the original moves them to
CUDA). Everything runs in float32 on the CPU with fixed seeds.
"""

from __future__ import annotations

import importlib.machinery
import inspect
import sys
import types
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
NOISE = 0.05  # every tensor of the state dict gets + NOISE * randn, so zero-initialised layers count too


def stub_modules() -> None:
    """Stand-ins for imports the inference path never uses."""

    class LightningModule(nn.Module):
        @property
        def device(self) -> torch.device:
            return next(self.parameters()).device

    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = LightningModule
    utilities = types.ModuleType("pytorch_lightning.utilities")
    distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
    distributed.rank_zero_only = lambda fn: fn
    pl.utilities = utilities
    utilities.distributed = distributed
    tv = types.ModuleType("torchvision")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    tv_utils = types.ModuleType("torchvision.utils")
    tv_utils.make_grid = None
    tv.utils = tv_utils
    for name, mod in {
        "pytorch_lightning": pl,
        "pytorch_lightning.utilities": utilities,
        "pytorch_lightning.utilities.distributed": distributed,
        "torchvision": tv,
        "torchvision.utils": tv_utils,
        "clip": types.ModuleType("clip"),
        "kornia": types.ModuleType("kornia"),
    }.items():
        sys.modules.setdefault(name, mod)


VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","]
    + "a an the of on in with and photo painting cat dog house tree red blue green sky "
    "over under small big oil by at night city street".split()
    + ["##s", "##ing", "##ed", "##er", "##ly"]
)
PROMPTS = ["A photo of a cat", "Paintings of red houses at night."]


def bert_tokenizer_from(vocab_file: Path):
    from transformers import BertTokenizerFast

    arg = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    return BertTokenizerFast(**{arg: str(vocab_file)}, do_lower_case=True)


def perturbed(model: nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The state dict with every float tensor + NOISE * randn; the schedule buffers stay exact."""
    schedule = {
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
        "posterior_mean_coef2", "lvlb_weights", "logvar", "model_ema.decay", "model_ema.num_updates",
    }  # fmt: skip
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone()
        if v.is_floating_point() and k not in schedule:
            v = v + NOISE * torch.randn(v.shape, generator=gen)
        out[k] = v.contiguous()
    return out


def build(config_path: Path) -> nn.Module:
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    return instantiate_from_config(OmegaConf.load(config_path).model).eval()


def ddim(model: nn.Module, c, uc, x_T: torch.Tensor, scale: float) -> torch.Tensor:
    """The original DDIMSampler: 10 steps, eta 0, classifier-free guidance `scale`."""
    from ldm.models.diffusion.ddim import DDIMSampler

    sampler = DDIMSampler(model)
    samples, _ = sampler.sample(
        S=10,
        conditioning=c,
        batch_size=x_T.shape[0],
        shape=tuple(x_T.shape[1:]),
        verbose=False,
        eta=0.0,
        x_T=x_T,
        unconditional_guidance_scale=scale,
        unconditional_conditioning=uc,
    )
    return samples


def save(folder: Path, state: dict, io: dict, model: nn.Module, half: tuple[str, ...] = ()) -> None:
    """model.safetensors (prefixes in `half` stored as fp16) and io.safetensors."""
    from safetensors.torch import save_file

    stored = {k: (v.half() if k.startswith(half) and v.is_floating_point() else v) for k, v in state.items()}
    save_file(stored, str(folder / "model.safetensors"))
    save_file({k: v.detach().contiguous().float() for k, v in io.items()}, str(folder / "io.safetensors"))


def load_rounded(model: nn.Module, state: dict, half: tuple[str, ...]) -> None:
    """Load the weights as a test will see them: fp16-stored tensors rounded the same way."""
    rounded = {
        k: (v.half().float() if k.startswith(half) and v.is_floating_point() else v) for k, v in state.items()
    }
    missing, unexpected = model.load_state_dict(rounded, strict=False)
    assert not missing and not unexpected, (missing, unexpected)


def make_cin256() -> None:
    folder = HERE / "ldm_cin256"
    torch.manual_seed(0)
    model = build(folder / "config.yaml")
    gen = torch.Generator().manual_seed(1)
    state = perturbed(model, gen)
    # LitEma shadows that differ from the raw UNet weights, so a test sees which ones were loaded.
    for k in state:
        if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates"):
            state[k] = state[k] + NOISE * torch.randn(state[k].shape, generator=gen)
    half = ("model.diffusion_model.", "model_ema.diffusion_model", "first_stage_model.", "cond_stage_model.")
    load_rounded(model, state, half)
    model.model_ema.copy_to(model.model)  # what `with model.ema_scope():` samples with

    g = torch.Generator().manual_seed(2)
    io: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        io["class_labels"] = torch.tensor([0, 7, 999, 1000])
        io["class_context"] = model.get_learned_conditioning({"class_label": io["class_labels"]})
        io["x"] = torch.randn(2, 4, 8, 8, generator=g)
        io["t"] = torch.tensor([10, 500])
        io["context"] = io["class_context"][1:3].clone()
        io["eps"] = model.apply_model(io["x"], io["t"], io["context"])
        io["image"] = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
        h = model.first_stage_model.encode(io["image"])  # encoder -> quant_conv (before quantisation)
        io["fs_encoded"] = h
        io["fs_decoded"] = model.decode_first_stage(h)  # quantise -> post_quant_conv -> decoder
        io["x_T"] = torch.randn(2, 4, 8, 8, generator=g)
        io["ddim_labels"] = torch.tensor([3, 42])
        c = model.get_learned_conditioning({"class_label": io["ddim_labels"]})
        uc = model.get_learned_conditioning({"class_label": torch.tensor([1000, 1000])})
        io["ddim10_cfg3"] = ddim(model, c, uc, io["x_T"], 3.0)
        io["alphas_cumprod"] = model.alphas_cumprod
    save(folder, state, io, model, half)


def make_txt2img() -> None:
    folder = HERE / "ldm_txt2img_1p4b"
    vocab_file = folder / "vocab" / "vocab.txt"
    vocab_file.parent.mkdir(parents=True, exist_ok=True)
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    import transformers

    transformers.BertTokenizerFast.from_pretrained = classmethod(
        lambda cls, *a, **k: bert_tokenizer_from(vocab_file)
    )

    torch.manual_seed(0)
    model = build(folder / "config.yaml")
    state = perturbed(model, torch.Generator().manual_seed(1))
    half = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
    load_rounded(model, state, half)

    g = torch.Generator().manual_seed(2)
    io: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        bert = model.cond_stage_model
        bert.tknz_fn.device = "cpu"  # the original's BERTTokenizer defaults to CUDA
        io["token_ids"] = bert.tknz_fn(PROMPTS)  # (2, 77): [CLS] ... [SEP] [PAD]...
        io["text_context"] = model.get_learned_conditioning(PROMPTS)
        io["null_context"] = model.get_learned_conditioning([""])
        io["random_ids"] = torch.randint(0, len(VOCAB), (2, 77), generator=g)
        io["random_ids_context"] = bert.transformer(io["random_ids"], return_embeddings=True)
        io["x"] = torch.randn(2, 4, 8, 8, generator=g)
        io["t"] = torch.tensor([10, 500])
        io["context"] = io["random_ids_context"].clone()
        io["eps"] = model.apply_model(io["x"], io["t"], io["context"])
        io["image"] = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
        posterior = model.first_stage_model.encode(io["image"])
        io["fs_posterior_mean"] = posterior.mean
        io["fs_posterior_logvar"] = posterior.logvar
        io["fs_decoded"] = model.first_stage_model.decode(posterior.mean)
        io["x_T"] = torch.randn(2, 4, 8, 8, generator=g)
        c = io["text_context"]
        uc = model.get_learned_conditioning(2 * [""])
        io["ddim10_cfg3"] = ddim(model, c, uc, io["x_T"], 3.0)
        io["alphas_cumprod"] = model.alphas_cumprod
    save(folder, state, io, model, half)


def main() -> None:
    stub_modules()
    import ldm.models.diffusion.ddim as ddim_module

    ddim_module.DDIMSampler.register_buffer = lambda self, name, attr: setattr(self, name, attr)
    torch.set_grad_enabled(False)
    make_cin256()
    make_txt2img()


if __name__ == "__main__":
    main()
