"""`python -m moe_engine ...`: the same as the `moe-engine` command."""

from moe_engine.cli import main

raise SystemExit(main())
