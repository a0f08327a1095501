"""python -m kvmlet"""

import sys

from kvmlet.cli import main

sys.exit(main())
