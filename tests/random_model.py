"""Small random models and prompts shared by the cache and manager tests."""
import torch

from tinytis.config import ModelArgs
from tinytis.model import Transformer


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    model = Transformer(args)
    model.init_weights(seed, std=0.1)
    return model.eval()


def random_prompts(args: ModelArgs, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, args.vocab_size, (n,), generator=g).tolist() for n in lengths]
