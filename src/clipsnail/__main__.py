import sys

from clipsnail.cli import main

sys.exit(main())
