"""vlforge: vision-language pretraining corpora and models."""

__version__ = "0.1.0"
