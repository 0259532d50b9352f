import sys

from vadlab.cli import main

sys.exit(main())
