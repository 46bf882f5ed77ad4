"""python -m webui [--host H] [--port P] [--data-dir D] [--models-dir M] [--outputs-dir O] [--share] [--auth U:P]"""

import sys

from .app import main

sys.exit(main())
