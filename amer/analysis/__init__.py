"""Geometry of hidden-state trajectories: training-time metrics, the curvature report engine, comparisons
and the statistics they rest on."""
