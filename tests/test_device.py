"""--device: auto picks what is there; cuda without a GPU is one line and exit 2 from every CLI that takes it."""
import runpy
import sys
from pathlib import Path

import pytest
import torch

from tinytis.device import resolve_device
from tinytis.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_auto_is_cuda_when_available():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_cuda_without_a_gpu_is_a_user_error():
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
@pytest.mark.parametrize("command", [["generate.py", "--prompt", "hi"], ["eval.py", "niah"], ["bench.py", "gpu", "--shape", "tiny"]])
def test_cli_with_cuda_and_no_gpu_is_one_line_and_exit_2(command, monkeypatch, capsys):
    module = runpy.run_path(str(ROOT / command[0]))  # the CLI's functions, without running it
    monkeypatch.setattr(sys, "argv", [*command, "--device", "cuda"])
    with pytest.raises(SystemExit) as exit_:
        run_cli(module["main"])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and captured.out == "", captured
