"""ldmfast.models: the VQGAN of stage 1 and the blocks the cLDM UNet reuses, built on ldmfast.ops."""
from .discriminator import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from .layers import AttnBlock, Downsample, ResnetBlock, Upsample, norm_act
from .perceptual import PerceptualLoss
from .quantizer import QuantizerOutput, VectorQuantizer, nearest_codes
from .vqgan import VQGAN, Decoder, Encoder, ModelConfigError, VQGANConfig

__all__ = [
    "AttnBlock", "Decoder", "Downsample", "Encoder", "ModelConfigError", "PatchDiscriminator", "PerceptualLoss",
    "QuantizerOutput", "ResnetBlock", "Upsample", "VQGAN", "VQGANConfig", "VectorQuantizer", "adaptive_gan_weight",
    "hinge_d_loss", "hinge_g_loss", "nearest_codes", "norm_act",
]
