"""Save every example model's weights (and the tagger's example inputs) without optimizing them, for the
batch configs in configs/:

    python examples/save_models.py [--out-dir DIR]      # default: $MODELS_DIR or examples/models
    lstmopt batch configs/examples.yaml
"""

import torch

import forecaster
import speech_encoder
import streaming
import tagger
from common import parse_args

if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    for module in (speech_encoder, tagger, forecaster, streaming):
        name = module.__name__
        torch.save(module.build().state_dict(), args.out_dir / f"{name}.pt")
        print(f"saved {args.out_dir / name}.pt")
    torch.save(tagger.example_batches(), args.out_dir / "tagger_inputs.pt")
    print(f"saved {args.out_dir / 'tagger_inputs.pt'}")
