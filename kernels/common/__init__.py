"""Headers shared by the CUDA kernels (shipped as package data)."""
