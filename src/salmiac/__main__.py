import sys

from salmiac.cli import main

sys.exit(main())
