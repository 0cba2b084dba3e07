import sys

from poolserve_stack.cli import main

sys.exit(main())
