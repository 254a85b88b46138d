"""PatchGAN discriminator (Isola et al. 2017, pix2pix) as used by taming-transformers and CompVis LDM."""

from __future__ import annotations

from torch import Tensor, nn


def weights_init(module: nn.Module) -> None:
    """DCGAN init (Radford et al. 2016): conv ~ N(0, 0.02); batch-norm scale ~ N(1, 0.02), shift 0."""
    classname = module.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """Fully convolutional: image (B, C, H, W) -> real/fake logits per overlapping patch (B, 1, H', W').

    With n_layers=3 and 4x4 kernels each logit sees a 70x70 patch; a 256x256 input gives 30x30 logits.
    Parameter names (`main.N.*`) match taming-transformers, so its discriminator checkpoints load.
    """

    def __init__(
        self,
        input_nc: int = 3,  # image channels
        ndf: int = 64,  # width of the first layer, doubled per layer up to 8x
        n_layers: int = 3,  # stride-2 layers; more layers = larger receptive field
    ) -> None:
        super().__init__()
        kw, padw = 4, 1
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw),
            nn.LeakyReLU(0.2, True),
        ]
        nf_mult = 1
        for n in range(1, n_layers):
            nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
            layers += [
                # no bias: the following batch norm has its own shift
                nn.Conv2d(
                    ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw, bias=False
                ),
                nn.BatchNorm2d(ndf * nf_mult),
                nn.LeakyReLU(0.2, True),
            ]
        nf_mult_prev, nf_mult = nf_mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw, bias=False),
            nn.BatchNorm2d(ndf * nf_mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw),  # one logit per patch
        ]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)
