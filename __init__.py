"""moeforge: pretrain DeepSeek-V3-style MoE models with PP x EP x DP, DualPipe and blockwise FP8.

The repository root is this package: launcher/, parallel/, model/, fp8/, comm/, dualpipe/, train/ and
conf/ install as `moeforge.launcher`, `moeforge.model`, ... (setup.cfg maps `moeforge` to the root), so
a user's own `train.py` or `model/` never shadows ours, nor ours theirs. Layers and the data flow of a
step: docs/architecture.md.
"""
