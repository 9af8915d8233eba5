import sys

from tpserve.cli import main

sys.exit(main())
