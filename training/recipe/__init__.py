"""The training recipe: the Accelerate loop alone, its state and checkpoints, precision, trackers, and the torch
side of each task."""
