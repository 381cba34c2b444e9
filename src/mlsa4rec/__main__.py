import sys

from mlsa4rec.cli import main

sys.exit(main())
