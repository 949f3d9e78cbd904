"""fracture_ops.explain."""
