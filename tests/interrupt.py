"""Interrupt a training run partway, then resume it: what the resume tests of the training stages share."""
import pytest


def interrupt_then_resume(monkeypatch, module, loss_name: str, at_call: int, train, args, resumed_args):
    """train(args) until the at_call-th call of module.<loss_name> raises KeyboardInterrupt, then train(resumed_args)."""
    real, calls = getattr(module, loss_name), {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, loss_name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(args)
    monkeypatch.setattr(module, loss_name, real)
    train(resumed_args)
