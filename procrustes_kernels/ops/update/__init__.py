"""The weight ops of a training step, one module per backend: ``reference`` (the definition, pure
PyTorch), ``cpp`` (the C++/OpenMP extension of ``csrc/``) and ``triton_kernels``. Import the
module you need; :mod:`procrustes_kernels.ops.dispatch` chooses between them."""
