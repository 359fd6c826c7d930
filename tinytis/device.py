"""--device auto|cpu|cuda: where the model, the KV cache, the policies' state and the sampling run."""
import torch

from tinytis.errors import UserError

CHOICES = ("auto", "cpu", "cuda")


def add_device_flag(parser):
    parser.add_argument("--device", choices=CHOICES, default="auto",
                        help="where the model and its KV cache run (auto: cuda when a GPU is available, else cpu)")


def resolve_device(name: str) -> torch.device:
    """The device a --device value names; cuda without a GPU is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                        "use --device cpu or auto")
    return torch.device(name)
