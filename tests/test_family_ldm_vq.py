"""Parity with the original CompVis latent-diffusion code: the LDM paper's VQ / unconditional / concat models.

Goldens in tests/goldens/<family>/ (made by tests/goldens/make_ldm_vq.py with the original code; keys in
tests/goldens/README.md): a tiny version of each released `models/ldm/<name>/config.yaml`, the original
LatentDiffusion's whole state dict (weights perturbed, fp16) and what the original returns for fixed inputs.
Each family loads through `load_model(model.safetensors, config=config.yaml)` exactly as sample.py does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.errors import UserError
from ldm.interop.load import load_model
from ldm.samplers import DiscreteDenoiser, StepSchedule, sample_ddim, start_x, to_variance_preserving

GOLDENS = Path(__file__).parent / "goldens"
FAMILIES = ["ldm_celeba_vq", "ldm_churches_kl", "ldm_bsr_sr", "ldm_semantic", "ldm_inpainting_big"]
CONCAT = ["ldm_bsr_sr", "ldm_semantic", "ldm_inpainting_big"]


def close(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """Within `rtol` of the reference, relative to its largest value (and in norm)."""
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < rtol, f"relative error {rel:.2e}"
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * ref.abs().max().item())


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    folder = GOLDENS / request.param
    loaded = load_model(folder / "model.safetensors", config=folder / "config.yaml")
    return request.param, loaded, load_file(str(folder / "io.safetensors"))


def conditioning(name: str, loaded, io: dict) -> dict:
    """Our conditioner's UNet kwargs for the golden conditioning inputs (as the sample.py task gives them)."""
    model = loaded.model
    size = tuple(io["unet_x"].shape[-2:])
    if name == "ldm_bsr_sr":
        inputs = {"lowres": io["cond_lowres"]}
    elif name == "ldm_semantic":
        inputs = {"segmap": io["cond_segmap"]}
    elif name == "ldm_inpainting_big":
        mask = io["cond_mask"]  # task=inpaint: masked_image = image * (mask < 0.5), mask in {0, 1}
        inputs = {"masked_image": io["cond_image"] * (mask < 0.5), "mask": mask}
    else:
        return {}
    with torch.no_grad():
        batch = model.conditioner.prepare(inputs)
        return model.conditioner(batch, train=False, encode_fn=model.encode_fn, latent_size=size)


def test_loads_with_the_expected_pieces(family):
    name, loaded, io = family
    model = loaded.model
    assert loaded.used_ema == (name == "ldm_celeba_vq")  # the only file with model_ema.* shadows
    expected_keys = {
        "ldm_bsr_sr": ("lowres",),
        "ldm_semantic": ("segmap",),
        "ldm_inpainting_big": ("masked_image", "mask"),
    }.get(name, ())
    assert loaded.input_keys == expected_keys
    assert float(model.first_stage.scale_factor) == (0.75 if name == "ldm_churches_kl" else 1.0)
    close(model.loss.schedule.alphas_cumprod.float(), io["alphas_cumprod"], 1e-6)


def test_unet_matches_original(family):
    name, loaded, io = family
    cond = conditioning(name, loaded, io) if name in CONCAT else {}
    if name in CONCAT:  # the UNet alone, on the original's own conditioning
        cond = {"concat": io["cond_out"]}
    with torch.no_grad():
        out = loaded.model.net(io["unet_x"], io["unet_t"], **cond)
    close(out, io["unet_out"], 1e-5)


def test_first_stage_matches_original(family):
    _, loaded, io = family
    codec = loaded.model.first_stage
    latent = codec.encode_pixels(io["fs_image"], sample=False)  # VQ: pre-quantisation h; KL: scaled mean
    close(latent, io["fs_latent"], 1e-5)
    close(codec.decode(io["fs_latent"]), io["fs_decoded"], 1e-5)  # VQ: quantised first


def test_conditioner_matches_original(family):
    name, loaded, io = family
    if name not in CONCAT:
        assert loaded.model.conditioner.conditioners == {} or len(loaded.model.conditioner.conditioners) == 0
        return
    close(conditioning(name, loaded, io)["concat"], io["cond_out"], 1e-5)


def test_ddim_trajectory_matches_original(family):
    name, loaded, io = family
    model = loaded.model
    cond = {"concat": conditioning(name, loaded, io)["concat"]} if name in CONCAT else {}
    alphas_cumprod = model.loss.schedule.alphas_cumprod
    denoiser = DiscreteDenoiser(model.net, alphas_cumprod, model.loss.parameterization)
    sigmas = StepSchedule(10, "leading", offset=1, final="min")(alphas_cumprod)  # 901, 801, ..., 1
    steps: list[torch.Tensor] = []

    def keep(info: dict) -> None:
        steps.append(to_variance_preserving(info["x"], info["sigma_next"]))

    with torch.no_grad():
        out = sample_ddim(
            denoiser, start_x(io["ddim_x_T"], sigmas[0]), sigmas, extra_args=cond, callback=keep, disable=True
        )
    out = to_variance_preserving(out, sigmas[-1])
    close(out, io["ddim_out"], 1e-4)
    close(torch.stack(steps), io["ddim_x_inter"][1:], 1e-4)  # after every step, not only the last


def test_ldm_inpainting_layout_differs_from_sd():
    """LDM: [E(masked), mask in {-1, 1}], masked pixels -1; SD keeps [mask in {0, 1}, E(masked)], fill 0."""
    from ldm.conditioning.spatial import InpaintingConditioner

    image = torch.rand(1, 3, 8, 8) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1
    batch = {"masked_image": image * (1 - mask), "mask": mask}
    seen = []

    def encode(x):
        seen.append(x)
        return x[:, :2, ::2, ::2]

    sd = InpaintingConditioner(latent_channels=2)(batch, encode_fn=encode)
    ldm = InpaintingConditioner(latent_channels=2, order="image_first", mask_range="pm1", masked_fill=-1)(
        batch, encode_fn=encode
    )
    assert torch.equal(sd[:, :1], mask[..., ::2, ::2]) and torch.equal(
        ldm[:, 2:], 2 * mask[..., ::2, ::2] - 1
    )
    assert torch.equal(seen[0], image * (1 - mask)) and torch.equal(seen[1], image * (1 - mask) - mask)


def test_user_errors_name_the_yaml_key(tmp_path):
    folder = GOLDENS / "ldm_bsr_sr"
    text = (folder / "config.yaml").read_text()
    bad = tmp_path / "config.yaml"
    bad.write_text(text.replace("cond_stage_key: LR_image", "cond_stage_key: caption"))
    with pytest.raises(UserError, match="model.params.cond_stage_key"):
        load_model(folder / "model.safetensors", config=bad)
    semantic = GOLDENS / "ldm_semantic"
    bad.write_text((semantic / "config.yaml").read_text().replace("out_channels: 3", "out_channels: 4"))
    with pytest.raises(
        UserError, match=r"cond_stage_model.channel_mapper.weight is \(3, 8, 1, 1\) .*out_channels: 3"
    ):
        load_model(semantic / "model.safetensors", config=bad)


@pytest.mark.parametrize("variant", ["new_order", "legacy_heads_upsample"])
def test_unet_options_match_original(variant):
    """use_new_attention_order, legacy=False, use_scale_shift_norm; num_heads_upsample, conv_resample."""
    import json

    from safetensors import safe_open

    from ldm.modules.unet import UNetModel

    path = GOLDENS / "ldm_unet_variants" / "unet.safetensors"
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["unet_config"])[variant]
    tensors = load_file(str(path))
    prefix = f"{variant}.weights."
    unet = UNetModel.from_compvis_config(config).eval()
    unet.load_state_dict({k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)})
    with torch.no_grad():
        out = unet(tensors[f"{variant}.x"], tensors[f"{variant}.t"])
    close(out, tensors[f"{variant}.out"], 1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_full_size_models_have_the_original_names_and_shapes(name, tmp_path):
    """The released config builds (on the meta device) with every name and shape the original has."""
    import json

    import yaml

    from ldm.conditioning.spatial import SpatialRescaler
    from ldm.interop import compvis

    entry = json.loads((GOLDENS / "ldm_vq_full_size_keys.json").read_text())[name]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"params": entry["params"]}}))
    params = compvis.read_yaml(path)
    ours: dict[str, list[int]] = {}
    with torch.device("meta"):
        parts = [("model.diffusion_model.", compvis.build_unet(params))]
        parts.append(("first_stage_model.", compvis.build_autoencoder(params)[0]))
        cond = params["cond_stage_config"]
        if isinstance(cond, dict) and cond["target"].endswith("SpatialRescaler"):
            parts.append(("cond_stage_model.", SpatialRescaler(**cond["params"])))
    for prefix, module in parts:
        ours.update({prefix + k: list(v.shape) for k, v in module.state_dict().items()})
    assert ours == entry["shapes"]
