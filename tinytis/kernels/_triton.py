"""triton and triton.language, or stand-ins that let the kernel modules be imported (not run) without Triton."""
try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # a CPU-only install: the torch reference functions still work
    AVAILABLE = False

    class _Missing:
        def jit(self, fn):
            return fn

        def __getattr__(self, name):
            return None

    triton = tl = _Missing()
