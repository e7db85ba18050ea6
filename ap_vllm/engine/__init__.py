"""Engine-core side of AttentionPack: the KV-cache spec of compacted layers, the KV manager that
frees their blocks, the scheduler that owns the engine's AttentionPack state, and the metrics it
reports (see the modules)."""
