"""The BentoML service: typed endpoints over an exported artifact, ONNX Runtime on the CPU, torch on CUDA."""
