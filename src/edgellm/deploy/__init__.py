"""Deployment: llama.cpp (GGUF conversion and its tools), and later ONNX and runtimes."""
