import sys

from protomesh.cli import main

sys.exit(main())
