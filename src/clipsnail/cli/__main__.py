"""`python -m clipsnail.cli`, the same as `python -m clipsnail`."""

import sys

from clipsnail.cli import main

sys.exit(main())
