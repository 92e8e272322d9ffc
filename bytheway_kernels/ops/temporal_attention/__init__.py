"""Fused temporal attention: q, k, v -> out with ByTheWay inside, the F x F map never in memory."""
