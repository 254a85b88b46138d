"""Conditioning behind one interface: batch key in, {crossattn, concat, class} out, a null value for CFG."""

from ldm.conditioning.base import BaseConditioner, EncodeFn
from ldm.conditioning.bert import BERTEmbedder, wordpiece_tokenizer
from ldm.conditioning.class_embed import ClassEmbedder
from ldm.conditioning.conditioner import Conditioner
from ldm.conditioning.noise_augment import NoiseAugmentedLowRes, NoiseLevel
from ldm.conditioning.spatial import InpaintingConditioner, SemanticMapConditioner, SuperResConditioner
from ldm.conditioning.text import FrozenTextEncoder, default_text_encoder

__all__ = [
    "BaseConditioner",
    "BERTEmbedder",
    "ClassEmbedder",
    "Conditioner",
    "EncodeFn",
    "FrozenTextEncoder",
    "InpaintingConditioner",
    "NoiseAugmentedLowRes",
    "NoiseLevel",
    "SemanticMapConditioner",
    "SuperResConditioner",
    "default_text_encoder",
    "wordpiece_tokenizer",
]
