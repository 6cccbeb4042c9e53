import sys

from mopc.cli import main

sys.exit(main())
