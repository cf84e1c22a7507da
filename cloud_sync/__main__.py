import sys

from cloud_sync.cli import main

sys.exit(main())
