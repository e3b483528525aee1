"""``python -m include.merge``: the same command as ``lora-deploy-merge`` (:mod:`include.cli.merge`)."""

import sys

from include.cli.merge import main

sys.exit(main())
