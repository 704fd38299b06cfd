"""Data: image-caption shards and bit-packed latent shards, streamed and resumable."""
