"""The Mixtral 4-bit path: MoE experts in NF4 with their own autograd node and Triton kernels,
attention-only checkpointing, kept dequantized weights, and building or loading a model straight
into 4 bit. How it works and why: README.md beside this file."""
