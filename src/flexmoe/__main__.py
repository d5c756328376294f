import sys

from flexmoe.cli import main

sys.exit(main())
