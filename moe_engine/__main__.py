"""`python -m moe_engine ...`: the same as the `moe-engine` command."""

import sys

try:
    from moe_engine.cli import main
except KeyboardInterrupt:          # Ctrl-C this early is still an interrupt, not a traceback
    print("\ninterrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
