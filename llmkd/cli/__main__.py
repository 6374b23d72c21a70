"""`python -m llmkd.cli`: the launchers (torchrun, accelerate, deepspeed) start the CLI this way."""
import sys

from llmkd.cli import main

sys.exit(main())
