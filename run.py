"""Launch LLaMA-Factory training with MoFaSGD: python run.py CONFIG [--ngpus N] [--base_output_dir DIR]."""

import sys

from llamafactory_mfsgd.launcher import main

if __name__ == "__main__":
    sys.exit(main())
