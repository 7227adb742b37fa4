"""`python -m scripts.bench`: the serving benchmark (scripts/bench/serving.py)."""

import sys

from scripts.bench.serving import main

sys.exit(main())
