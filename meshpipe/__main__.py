import sys

from meshpipe.cli import main

sys.exit(main())
