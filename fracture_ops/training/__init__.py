"""fracture_ops.training."""
