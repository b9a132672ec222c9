"""Blocks: the layers every recipe is assembled from (embeddings, attention, encoders, poolers)."""

from vlforge.train.blocks.attention import Attention, attention_mask
from vlforge.train.blocks.coattention import CoAttentionLayer
from vlforge.train.blocks.cross_modality import CrossModalityLayer
from vlforge.train.blocks.mean_region_embeddings import MeanRegionEmbeddings
from vlforge.train.blocks.mlp import MLP, activation
from vlforge.train.blocks.patch_embeddings import PatchEmbeddings
from vlforge.train.blocks.pooler import Pooler
from vlforge.train.blocks.region_embeddings import RegionEmbeddings, prepend_global_region
from vlforge.train.blocks.resnet import ModifiedResNet
from vlforge.train.blocks.roi_features import RoIFeatureExtractor, build_roi_extractor
from vlforge.train.blocks.segment_embeddings import SegmentEmbeddings
from vlforge.train.blocks.seq2seq_mask import seq2seq_attention_mask
from vlforge.train.blocks.sparse_attention import SparseDecoder, sparse_mask
from vlforge.train.blocks.text_embeddings import TextEmbeddings
from vlforge.train.blocks.text_transformer import CausalTextTransformer
from vlforge.train.blocks.token_sampling import sample_tokens
from vlforge.train.blocks.torchvision_resnet import ResNetFeatures
from vlforge.train.blocks.transformer import TransformerEncoder, TransformerLayer
from vlforge.train.blocks.vit import VisionTransformer

__all__ = [
    "MLP",
    "MeanRegionEmbeddings",
    "Attention",
    "CausalTextTransformer",
    "CoAttentionLayer",
    "CrossModalityLayer",
    "ModifiedResNet",
    "PatchEmbeddings",
    "Pooler",
    "RegionEmbeddings",
    "ResNetFeatures",
    "RoIFeatureExtractor",
    "SegmentEmbeddings",
    "SparseDecoder",
    "TextEmbeddings",
    "TransformerEncoder",
    "TransformerLayer",
    "VisionTransformer",
    "activation",
    "attention_mask",
    "build_roi_extractor",
    "prepend_global_region",
    "sample_tokens",
    "seq2seq_attention_mask",
    "sparse_mask",
]
