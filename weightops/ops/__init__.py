"""Stream operators: deltas, TencentPretrain remapping, vocabulary resizing."""
