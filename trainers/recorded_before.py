"""Settings added after runs were recorded, each at the behaviour of the runs recorded before it: one table for the
training and the compression settings. Such a setting enters a run's content key only where it differs from this
(so that every recorded run keeps its key and a sweep does not train it again), and a record without it was trained
this way."""

RECORDED_BEFORE = {
    # training (TrainConfig)
    "schedule": "cosine", "decay": "matrices", "tie_embeddings": True, "init": "fan_in", "norm_eps": 1e-6,
    "mlp_multiple": 0, "sampling": "random", "data_seed": None, "step_rounding": "ceil",
    # compression (Compression)
    "sparse_quantized": "unrotated", "fp4_trust": "intended", "g_format": None, "gw_format": None, "gx_format": None,
    "bwd_hadamard_block": 0, "dgrad_format": None, "wgrad_format": None, "keep_dense": 0.0, "recipe": None,
    "weight_only_rotation": "both",
}
