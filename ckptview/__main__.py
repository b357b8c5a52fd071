import sys

from ckptview.cli import main

sys.exit(main())
