"""Featurize: region detector, object tags, text scene graphs, detector training on the demo world."""
