import sys

from lorafair.cli import main

sys.exit(main())
