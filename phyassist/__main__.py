import sys

from phyassist.cli import main

sys.exit(main())
