import sys

from tpgrpo.cli import main

sys.exit(main())
