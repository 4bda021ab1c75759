import sys

from .cli import retrain_main

sys.exit(retrain_main())
