"""The torch-free contract shared by training and serving.

Everything that both sides must agree on lives here: the task definitions and label order, the one
text-encoding function, score post-processing, metrics, baselines and the artifact manifest.
Nothing in this package imports torch.
"""
