import sys

from sft_hf.cli import main

sys.exit(main())
