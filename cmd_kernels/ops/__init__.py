"""One module per op: its PyTorch reference, Triton kernels, launchers and ``torch.library`` registration
(custom op, fake impl, autograd), then the public function. The public functions are re-exported by
``cmd_kernels`` (``cmd_kernels.content_frame`` is the op; ``cmd_kernels.ops.content_frame`` its module).

Adding an op: a module here with the same parts; its public function checks its inputs, asks
``cmd_kernels._dispatch.use_triton`` once, and calls either the custom op (which always launches the kernel)
or the reference; a case per launch site in ``cmd_kernels/aot.py``; tests against an fp64 reference with
``cmd_kernels.testing``.
"""
