# All metadata lives in pyproject.toml. The extension is built just in time by
# vapo_kernels/_backends.py (see README "How the C++ / CUDA code is built"), which keeps
# `pip install` free of torch at build time.
from setuptools import setup

setup()
