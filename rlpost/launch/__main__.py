import sys

from rlpost.launch.cli import main

sys.exit(main())
