"""Pure-torch reference kernels and the one gateway to optional CUDA kernels (``kernels.py``)."""
