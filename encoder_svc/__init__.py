"""Text-encoder stage: tokenizers + text encoders of one checkpoint, served over gRPC."""
