"""Blocks: the layers every recipe is assembled from (embeddings, attention, encoders, poolers)."""

from vlforge.train.blocks.attention import Attention, attention_mask
from vlforge.train.blocks.coattention import CoAttentionLayer
from vlforge.train.blocks.mlp import MLP, activation
from vlforge.train.blocks.pooler import Pooler
from vlforge.train.blocks.region_embeddings import RegionEmbeddings, prepend_global_region
from vlforge.train.blocks.resnet import ModifiedResNet
from vlforge.train.blocks.text_embeddings import TextEmbeddings
from vlforge.train.blocks.text_transformer import CausalTextTransformer
from vlforge.train.blocks.transformer import TransformerEncoder, TransformerLayer
from vlforge.train.blocks.vit import VisionTransformer

__all__ = [
    "MLP",
    "Attention",
    "CausalTextTransformer",
    "CoAttentionLayer",
    "ModifiedResNet",
    "Pooler",
    "RegionEmbeddings",
    "TextEmbeddings",
    "TransformerEncoder",
    "TransformerLayer",
    "VisionTransformer",
    "activation",
    "attention_mask",
    "prepend_global_region",
]
