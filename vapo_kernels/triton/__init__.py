"""Triton kernels, one module per op family (imported lazily by the ``triton`` backend).

Triton reads ``TRITON_INTERPRET`` when it is first imported, so these modules are only
imported on first use: set ``TRITON_INTERPRET=1`` before that to run them on CPU tensors.
"""
