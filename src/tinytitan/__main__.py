import sys

from tinytitan.cli.main import main

sys.exit(main())
