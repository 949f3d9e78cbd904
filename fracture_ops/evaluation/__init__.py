"""fracture_ops.evaluation."""
