"""The artifact store: content-addressed stage outputs with manifests, hashing, file placement."""
