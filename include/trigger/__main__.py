"""``python -m include.trigger``: the same command as ``lora-deploy-trigger`` (:mod:`include.cli.trigger`)."""

import sys

from include.cli.trigger import main

sys.exit(main())
