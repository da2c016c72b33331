"""`python -m anchordiff_client workflow_api.json ...`: see docs/CLIENT.md."""
import sys

from . import main

sys.exit(main())
