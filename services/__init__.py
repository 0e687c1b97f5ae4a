"""Runtime shared by every stage service: config, tensor codec, gRPC bootstrap, logging, model registry."""
