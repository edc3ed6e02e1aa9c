"""Preprocessing: dataset adapters and manifests, media decoding, faces, log-mel features and shards."""
