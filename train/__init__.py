"""Train: data loading, tokenizer, masking, model blocks, recipes, scaling, trainer, eval."""
