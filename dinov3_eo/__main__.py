import sys

from dinov3_eo.cli import main

sys.exit(main())
