import sys

from vlmtune.cli import main

sys.exit(main())
