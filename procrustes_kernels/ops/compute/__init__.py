"""The sparse compute ops (linear / conv2d forward and input gradient from the compressed weight):
``reference`` (the definition), ``triton_linear`` and ``triton_conv`` (the kernels, sharing
``triton_common``), and ``index`` (the tile index and the load-balancing schedules). Import the
module you need; :mod:`procrustes_kernels.ops.dispatch` chooses between them."""
