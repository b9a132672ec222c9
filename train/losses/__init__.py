"""Losses: pretraining heads and objectives (MLM, MRC, MRC-KL, MRFR, ITM, WRA by IPOT, InfoNCE)."""

from vlforge.train.losses.cmcl import cmcl_loss, multi_positive_nce
from vlforge.train.losses.contrastive import ContrastiveLoss, gather_features
from vlforge.train.losses.dvae import gumbel_codes, kl_to_uniform, reconstruction_loss
from vlforge.train.losses.itm import ITMHead, itm_loss, itm_score
from vlforge.train.losses.mlm import IGNORE, MLMHead, masked_select, mlm_loss
from vlforge.train.losses.mrc import RegionClassifier, hard_region_labels, mrc_kl_loss, mrc_loss
from vlforge.train.losses.mrfr import RegionFeatureRegressor, mrfr_loss
from vlforge.train.losses.ot import cosine_cost, ipot, optimal_transport_distance, wra_loss
from vlforge.train.losses.qa import AnswerHead, qa_loss

__all__ = [
    "AnswerHead",
    "IGNORE",
    "ContrastiveLoss",
    "ITMHead",
    "MLMHead",
    "RegionClassifier",
    "RegionFeatureRegressor",
    "cmcl_loss",
    "cosine_cost",
    "gather_features",
    "gumbel_codes",
    "hard_region_labels",
    "ipot",
    "itm_loss",
    "itm_score",
    "kl_to_uniform",
    "masked_select",
    "mlm_loss",
    "mrc_kl_loss",
    "mrc_loss",
    "mrfr_loss",
    "multi_positive_nce",
    "optimal_transport_distance",
    "qa_loss",
    "reconstruction_loss",
    "wra_loss",
]
