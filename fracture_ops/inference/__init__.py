"""fracture_ops.inference."""
