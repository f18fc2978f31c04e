import sys

from fastcbm.cli import main

sys.exit(main())
