"""ldmfast.models: the VQGAN of stage 1, the cLDM of stage 2 and their blocks, built on ldmfast.ops;
a KL autoencoder, and the latent codec that hides which autoencoder a model uses."""
from .autoencoder_kl import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from .cldm import ConditionalLDM, CTPCondition, DiffusionConfig
from .discriminator import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from .latent_codec import decode_latent, freeze_autoencoder, load_autoencoder, to_latent
from .layers import AttnBlock, Downsample, ResnetBlock, Upsample, norm_act
from .perceptual import PerceptualLoss
from .quantizer import QuantizerOutput, VectorQuantizer, nearest_codes
from .unet import UNet, UNetConfig, timestep_embedding
from .vqgan import VQGAN, Decoder, Encoder, ModelConfigError, VQGANConfig

__all__ = [
    "AttnBlock", "AutoencoderKL", "AutoencoderKLConfig", "CTPCondition", "ConditionalLDM", "Decoder",
    "DiagonalGaussian", "DiffusionConfig", "Downsample", "Encoder", "ModelConfigError", "PatchDiscriminator",
    "PerceptualLoss", "QuantizerOutput", "ResnetBlock", "UNet", "UNetConfig", "Upsample", "VQGAN",
    "VQGANConfig", "VectorQuantizer", "adaptive_gan_weight", "decode_latent", "freeze_autoencoder",
    "hinge_d_loss", "hinge_g_loss", "load_autoencoder", "nearest_codes", "norm_act", "timestep_embedding",
    "to_latent",
]
