"""Where a cluster's KV-cache lives (``ClusterConfig.mode``), in a module the CLI reads without loading torch:
``shards`` (CPU KVShards attend), ``gpu-only`` (a pool on the GPU, each step one CUDA graph) or ``hybrid`` (the
faster of the two for the planned batch, measured at start-up)."""

MODES = ("gpu-only", "shards", "hybrid")
