"""Corpus pipeline: URL lists, crawl, filters, dedup, shard writing, Beam entry points."""
