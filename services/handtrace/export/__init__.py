"""Training-data export (issue #12): demonstrations as trajectories for training jobs."""
