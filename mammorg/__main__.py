import sys

from mammorg.cli import main

sys.exit(main())
