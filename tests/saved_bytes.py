"""What autograd keeps for backward: the NF4 tests check that no dense weight is among it."""
import torch


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while fn runs."""
    total = []
    pack = lambda t: total.append(t.numel() * t.element_size()) or t  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)
